"""The evidence grid: every implemented method on the three shared industrial data sets (192 px) and on
Fashion-MNIST's one-class protocol (all 10 classes, the whole test set, 64 px), one seed, through the
real `adaptad grid` (Prefect + local Ray + MLflow).

Usage: .venv/bin/python benchmarks/grid_evidence.py [--out runs/evidence] [--only industrial|fashion_mnist]
       [--methods ...] [--dry-run]

Writes ``<out>/params_<name>.yaml`` once (the repo's params.yaml + the evidence settings below; reused
afterwards, so the run keys stay put), the manifests,
and one leaderboard per part under ``<out>/<name>/`` (leaderboard.md / .parquet, jobs.parquet); both parts
share the run folders ``<out>/jobs`` and the MLflow store ``<out>/mlflow.db``. A job is reused by its run
key, whose code version is the content of the result code (flows/params.py ``code_version``): stopping
and re-running continues where it stopped, across commits that do not touch components/, flows/train.py
or flows/evaluate.py. Every job's own seconds are in jobs.parquet; the script prints the wall time of
each part of this invocation.

Deviations, all CPU budgets or offline constraints (METHODS.md, params.yaml): the backbone is
tf_efficientnet_lite0 with the offline ImageNet weights; Fashion-MNIST's 28 px images are upsampled to
64 px (papers: 224); fine-tuned methods run params.yaml's CPU-budget epochs. PANDA-OE needs an outlier
set and ImageNet-22k / 80M Tiny Images are not available offline, so each part uses the *other* domain
as its outliers: Fashion-MNIST train images (``OE_FASHION`` of them, every class) for the industrial sets,
the industrial sets' normal train images for Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
INDUSTRIAL = REPO.parent / "shared" / "data" / "industrial"
FASHION = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = ["deeppcb", "kolektorsdd", "magnetic_tile"]
METHODS = [
    "dn2", "spade", "patchcore", "gaussian", "padim",
    "panda", "panda_oe", "gaussian_ft", "topology", "recontrast",
]  # fmt: skip
OE_FASHION = 3000
PARTS = {"industrial": 192, "fashion_mnist": 64}


def fashion_outliers(folder: Path) -> Path:
    """``OE_FASHION`` Fashion-MNIST train images (seeded, all classes) as PNG files — written once."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == OE_FASHION:
        return folder
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    pick = np.random.default_rng(0).choice(len(images), OE_FASHION, replace=False)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in pick:
        Image.fromarray(images[i]).save(tmp / f"fmnist_{i:05d}.png")
    tmp.rename(folder)
    return folder


def industrial_outliers(folder: Path) -> Path:
    """Links to the industrial sets' normal train images (no test images, no masks)."""
    if not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for category in CATEGORIES:
            for image in sorted((INDUSTRIAL / category / "train" / "good").iterdir()):
                (tmp / f"{category}_{image.name}").symlink_to(image.resolve())
        tmp.rename(folder)
    return folder


def write_params(out: Path, name: str, methods: list[str], fresh: bool = False) -> Path:
    """``<out>/params_<name>.yaml``, written once: later invocations reuse it (only ``grid.methods``
    follows ``--methods``), so a changed params.yaml default never changes the evidence's run keys."""
    path = out / f"params_{name}.yaml"
    if path.is_file() and not fresh:
        params = yaml.safe_load(path.read_text())
        params["grid"]["methods"] = methods
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] |= {
        "industrial": {"root": str(INDUSTRIAL), "categories": CATEGORIES},
        "fashion_mnist": {"layout": "fashion_mnist", "root": str(FASHION)},
    }
    params["dataset"] = name
    params["image_size"] = PARTS[name]
    params["manifests_dir"] = str(out / "manifests")
    params["train"] |= {"num_workers": 2, "cpus_per_worker": 1}
    oe = industrial_outliers(out / "oe_industrial") if name == "fashion_mnist" else None
    oe = oe or fashion_outliers(out / "oe_fashion_mnist")
    params["methods"]["panda_oe"]["outliers"] = str(oe)
    params["grid"].update(
        datasets=[name],
        categories={},
        methods=methods,
        backbones=[],
        image_sizes=[],
        seeds=[0],
        concurrency=1,
        cpus_per_job=2,
        runs_dir=str(out / "jobs"),
        output=str(out / name),
        metrics_file=str(out / name / "grid.json"),
        plots_dir=str(out / name / "plots"),
    )
    params["mlflow"] |= {
        "tracking_uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "artifact_root": str((out / "mlartifacts").resolve()),
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "evidence")
    ap.add_argument("--only", choices=list(PARTS), action="append")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--fresh-params", action="store_true", help="rewrite the params files from params.yaml")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    adaptad = str(Path(sys.executable).with_name("adaptad"))
    code = 0
    for name in args.only or list(PARTS):
        path = write_params(out, name, args.methods, args.fresh_params)
        t0 = time.perf_counter()
        subprocess.run([adaptad, "prepare", "--params", str(path)], cwd=REPO, check=True)
        grid = [adaptad, "grid", "--params", str(path)] + (["--dry-run"] if args.dry_run else [])
        code |= subprocess.run(grid, cwd=REPO).returncode
        print(f"[evidence] {name}: {time.perf_counter() - t0:.0f} s wall (this invocation)", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
