"""The evidence grid: every implemented method on the three shared industrial data sets (192 px) and on
Fashion-MNIST's one-class protocol (all 10 classes, the whole test set, 64 px), one seed, through the
real `adaptad grid` (Prefect + local Ray + MLflow).

Usage: .venv/bin/python benchmarks/grid_evidence.py [--out DIR] [--data DIR]
       [--only industrial|fashion_mnist] [--methods ...] [--dry-run] [--archive-only]

Writes ``<out>/params_<name>.yaml`` once (the repo's params.yaml + the evidence settings below; reused
afterwards, so the run keys stay put). The files name no folder of one machine: ``${EVIDENCE_OUT}`` is
``--out`` and ``${SHARED_DATA}`` is ``--data`` (the folder holding ``industrial/``, default
``../shared/data`` beside the repo); the script sets both for the grid, and a study that runs one of
the archived files directly sets them itself (``benchmarks/evidence/*/README.md``). It also writes the
manifests,
and one leaderboard per part under ``<out>/<name>/`` (leaderboard.md / .parquet, jobs.parquet); both parts
share the run folders ``<out>/jobs`` and the MLflow store ``<out>/mlflow.db``. A job is reused by its run
key, whose code version is the content of the result code (flows/params.py ``code_version``): stopping
and re-running continues where it stopped, across commits that do not touch components/, flows/train.py
or flows/evaluate.py. The key holds paths, though: the data version hashes each image's path as the
manifest holds it (``--data``/industrial/…) beside its bytes, and PANDA-OE's key names its outlier folder
(``--out``/oe_…). A machine whose folders lie elsewhere than the archive's (``--data /work/shared/data``,
``--out /work/evidence/runs/evidence``) re-runs those jobs under keys of its own (the industrial part and
PANDA-OE; Fashion-MNIST's Debian path is the same everywhere).
Every job's own seconds are in jobs.parquet; the script prints the wall time of
each part of this invocation.

The grid takes longer than one working session on a 2-core CPU, and a session's machine does not keep
``runs/``. So the evidence is carried in the repository, under ``benchmarks/evidence/`` (``ARCHIVE``):
the pinned params files; every finished job's evaluation folder without the fitted method and the
figures (metrics.json, scores.parquet, roc/pro curves, history, the examples behind the side-by-side heat
maps: about 0.5 MB a job at 192 px, as git stores the examples' images, identical across methods, once;
the models and banks are 30-90 MB); each part's leaderboard; and ``sessions.jsonl``, one line per
invocation with its wall time and the jobs it added. Each invocation first restores the archive into
``--out`` (missing folders only) and archives after each part, also when the grid failed or was
interrupted: exactly the jobs of the part's current plan, so the archive drops jobs whose run key a
change of the result code retired. ``--archive-only`` archives what ``--out`` holds and runs nothing
(after a grid was stopped). A restored job counts as done for the grid (its ``evaluation/metrics.json``
is there) and is logged to MLflow and the leaderboard as usual; it has no ``method/``, so it cannot
serve predictions, and no ``heatmaps.png`` / ``curves.png``.

Deviations, all CPU budgets or offline constraints (METHODS.md, params.yaml): the backbone is
tf_efficientnet_lite0 with the offline ImageNet weights; Fashion-MNIST's 28 px images are upsampled to
64 px (papers: 224); fine-tuned methods run params.yaml's CPU-budget epochs. PANDA-OE needs an outlier
set and ImageNet-22k / 80M Tiny Images are not available offline, so each part uses the *other* domain
as its outliers: Fashion-MNIST train images (``OE_FASHION`` of them, every class) for the industrial sets,
the industrial sets' normal train images for Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "benchmarks" / "evidence"
# the params files name the machine's folders through these environment variables (flows/params.py
# expands ``${NAME}``), so the archived files serve any clone; main() sets them from --out and --data
OUT_VARIABLE, DATA_VARIABLE = "EVIDENCE_OUT", "SHARED_DATA"
FASHION = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = ["deeppcb", "kolektorsdd", "magnetic_tile"]
METHODS = [
    "dn2", "spade", "patchcore", "gaussian", "padim",
    "panda", "panda_oe", "gaussian_ft", "topology", "recontrast",
]  # fmt: skip
#: frozen methods also run on the backbones fine-tuned methods adapted (grid.adapted: <adapter>+<method> jobs,
#: which reuse the adapter's training job by its run key)
ADAPTED = {"patchcore": ["topology"]}
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
        industrial = Path(os.environ[DATA_VARIABLE]) / "industrial"
        for category in CATEGORIES:
            for image in sorted((industrial / category / "train" / "good").iterdir()):
                (tmp / f"{category}_{image.name}").symlink_to(image.resolve())
        tmp.rename(folder)
    return folder


OUTLIERS = {"fashion_mnist": "oe_industrial", "industrial": "oe_fashion_mnist"}


def outliers(out: Path, name: str) -> Path:
    """PANDA-OE's outlier folder of part ``name``: the other domain (module docstring), made if missing."""
    if name == "fashion_mnist":
        return industrial_outliers(out / OUTLIERS[name])
    return fashion_outliers(out / OUTLIERS[name])


def write_params(out: Path, name: str, methods: list[str], fresh: bool = False) -> Path:
    """``<out>/params_<name>.yaml``, written once: later invocations reuse it (only ``grid.methods``
    follows ``--methods`` and ``grid.adapted`` ADAPTED), so a changed params.yaml default never changes the
    evidence's run keys."""
    path = out / f"params_{name}.yaml"
    outliers(out, name)  # not archived: rebuilt (deterministically) on a new machine
    if path.is_file() and not fresh:
        params = yaml.safe_load(path.read_text())
        params["grid"]["methods"] = methods
        params["grid"]["adapted"] = ADAPTED
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    here, data = "${" + OUT_VARIABLE + "}", "${" + DATA_VARIABLE + "}"
    params["datasets"] |= {
        "industrial": {"root": f"{data}/industrial", "categories": CATEGORIES},
        "fashion_mnist": {"layout": "fashion_mnist", "root": str(FASHION)},
    }
    params["dataset"] = name
    params["image_size"] = PARTS[name]
    params["manifests_dir"] = f"{here}/manifests"
    params["train"] |= {"num_workers": 2, "cpus_per_worker": 1}
    params["methods"]["panda_oe"]["outliers"] = f"{here}/{OUTLIERS[name]}"
    params["grid"].update(
        datasets=[name],
        categories={},
        methods=methods,
        adapted=ADAPTED,
        backbones=[],
        image_sizes=[],
        seeds=[0],
        concurrency=1,
        cpus_per_job=2,
        runs_dir=f"{here}/jobs",
        output=f"{here}/{name}",
        metrics_file=f"{here}/{name}/grid.json",
        plots_dir=f"{here}/{name}/plots",
    )
    params["mlflow"] |= {
        "tracking_uri": f"sqlite:///{here}/mlflow.db",
        "artifact_root": f"{here}/mlartifacts",
    }
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _copy_atomic(source: Path, target: Path, ignore=None) -> None:
    """Copy the folder ``source`` to ``target`` through a temporary sibling (components.banks.replace_dir)."""
    from components.atomic import replace_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, ignore=ignore, dirs_exist_ok=True)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(out: Path, store: Path) -> int:
    """Copy the archive's params files and evaluation folders into ``out`` where missing; returns the
    number of jobs restored."""
    restored = 0
    for path in store.glob("params_*.yaml"):
        if not (out / path.name).is_file():
            shutil.copy(path, out / path.name)
    for evaluation in sorted(store.glob("jobs/*/evaluation")):
        target = out / "jobs" / evaluation.parent.name / "evaluation"
        if not (target / "metrics.json").is_file():
            _copy_atomic(evaluation, target)
            restored += 1
    return restored


def plan_of(params: Path, methods: list[str] | None = None):
    """The part's grid plan (flows.grid.expand: every job and its run key), without the method checks;
    ``methods`` replaces the file's ``grid.methods``."""
    from flows.grid import expand
    from flows.params import load_params

    return expand(load_params(params, {"grid.methods": methods} if methods else None), params, check=False)


def done_jobs(plan) -> list:
    from flows.grid import job_done

    return [job for job in plan.jobs if job_done(plan, job)]


def archive(out: Path, store: Path, name: str, params: Path, plan) -> int:
    """Archive the part's finished jobs (the plan's, without ``method/`` and PNGs) and its leaderboard;
    drops archived jobs of this part that no method's plan has any more (a run key retired by a change of
    the result code; not the jobs of methods left out by ``--methods``). Returns the number of finished
    jobs."""
    keys = {job.run_key for job in plan_of(params, METHODS).jobs}
    shutil.copy(params, store / params.name)
    for folder in store.glob("jobs/*"):
        metrics = folder / "evaluation" / "metrics.json"
        stale = folder.name not in keys and (
            not metrics.is_file() or json.loads(metrics.read_text()).get("dataset") == name
        )
        if stale:
            shutil.rmtree(folder)
    done = done_jobs(plan)
    for job in done:
        source = plan.runs_dir / job.run_key / "evaluation"
        target = store / "jobs" / job.run_key / "evaluation"
        if not (target / "metrics.json").is_file():
            _copy_atomic(source, target, ignore=shutil.ignore_patterns("method", "*.png"))
    board = out / name
    if (board / "leaderboard.md").is_file():
        _copy_atomic(board, store / name, ignore=shutil.ignore_patterns("grid.json", "plots", ".*"))
    return len(done)


def log_session(store: Path, part: str, wall: float, before: int, done: int, total: int, code: int) -> None:
    """One line of ``<archive>/sessions.jsonl``: when, how long, what this invocation added."""
    line = {
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "part": part,
        "wall_seconds": round(wall, 1),
        "jobs_done_before": before,
        "jobs_done_after": done,
        "jobs": total,
        "exit_code": code,
    }
    with open(store / "sessions.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def run_stoppable(command: list[str]) -> int:
    """Run ``command`` in its own process group; on SIGINT / SIGTERM stop it with SIGINT, wait up to
    30 s, then end the whole group (the grid's Ray processes and Prefect API live in it: a grid waiting
    on a running job does not exit on SIGINT alone). Returns its exit code, 130 when stopped."""
    stop = []
    handler = lambda signum, frame: stop.append(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        while process.poll() is None and not stop:
            time.sleep(1)
        if stop:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        return 130 if stop else process.returncode
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # what is left of the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
                time.sleep(5 if sig == signal.SIGTERM else 0)
        process.wait()
        for sig, old in previous.items():
            signal.signal(sig, old)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=os.environ.get(OUT_VARIABLE, REPO / "runs" / "evidence"),
        help=f"where the grid runs (default: ${OUT_VARIABLE}, else %(default)s)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=os.environ.get(DATA_VARIABLE, REPO.parent / "shared" / "data"),
        help=f"the folder holding industrial/ (default: ${DATA_VARIABLE}, else %(default)s)",
    )
    ap.add_argument("--only", choices=list(PARTS), action="append")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--fresh-params", action="store_true", help="rewrite the params files from params.yaml")
    ap.add_argument("--archive", type=Path, default=ARCHIVE, help="the archive (default: %(default)s)")
    ap.add_argument("--archive-only", action="store_true", help="archive --out, run nothing")
    args = ap.parse_args()
    store, out = args.archive.resolve(), args.out.resolve()
    if not (args.data / "industrial").is_dir():
        ap.error(f"--data {args.data}: no industrial/ folder there (set --data or ${DATA_VARIABLE})")
    os.environ[OUT_VARIABLE], os.environ[DATA_VARIABLE] = str(out), str(args.data)  # the params' ${...}
    out.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    print(f"[evidence] {restore(out, store)} finished jobs restored from {store}", flush=True)
    adaptad = str(Path(sys.executable).with_name("adaptad"))
    code = 0
    for name in args.only or list(PARTS):
        path = write_params(out, name, args.methods, args.fresh_params)
        t0 = time.perf_counter()
        subprocess.run([adaptad, "prepare", "--params", str(path)], cwd=REPO, check=True)
        plan = plan_of(path)  # job_done reads the run folders: the same plan serves before and after
        before, result = len(done_jobs(plan)), 0
        if not args.archive_only:
            grid = [adaptad, "grid", "--params", str(path)] + (["--dry-run"] if args.dry_run else [])
            result = run_stoppable(grid)
            code |= result
        wall = time.perf_counter() - t0
        print(f"[evidence] {name}: {wall:.0f} s wall (this invocation)", flush=True)
        if not args.dry_run:
            done = archive(out, store, name, path, plan)
            print(f"[evidence] {name}: {done} of {len(plan.jobs)} jobs done, archived", flush=True)
            if not args.archive_only:
                log_session(store, name, wall, before, done, len(plan.jobs), result)
        if result == 130:
            break
    return code


if __name__ == "__main__":
    raise SystemExit(main())
