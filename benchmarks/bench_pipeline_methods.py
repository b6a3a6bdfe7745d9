"""Methods compared with the same backbone and image size on each shared industrial data set, through the
real pipeline (`adaptad prepare` + `adaptad pipeline`): frozen baselines vs the fine-tuned methods.

Usage: .venv/bin/python benchmarks/bench_pipeline_methods.py [--methods dn2 panda gaussian gaussian_ft ...]
       [--root ../shared/data/industrial] [--categories ...] [-S KEY=VALUE ...]
Everything (manifest, runs, MLflow store) goes to a temporary folder; the repo's params.yaml gives the
defaults. Prints image AUROC, pixel AUROC and AUPRO per data set and method, the epochs trained and the
one kept (validation-based selection), whether the collapse monitor stopped the run, training and
evaluation seconds, the wall time of each pipeline run and its peak memory (sum of the resident memory of
the pipeline's whole process tree: driver, Ray workers, loaders; sampled every 0.5 s). TPTL (topology)
trains one model for all the given data sets together (their names are its classes), as the paper does
for a dataset's categories.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import service_env  # noqa: E402

CATEGORIES = ["deeppcb", "kolektorsdd", "magnetic_tile"]


def run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; return the result, wall seconds and the peak RSS (GiB) of its whole process tree."""
    peak, done = [0.0], threading.Event()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak[0] = max(peak[0], total / 2**30)
            except psutil.Error:
                pass
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), wall, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "industrial")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES)
    parser.add_argument("--methods", nargs="+", default=["dn2", "panda"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptad-panda-") as tmp:
        work = Path(tmp)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["datasets"]["industrial"] = {"root": str(args.root.resolve()), "categories": args.categories}
        params.update(dataset="industrial", manifests_dir=str(work / "manifests"))
        params["train"]["storage"] = str(work / "ray")
        params["pipeline"].update(
            runs_dir=str(work / "runs"),
            metrics_file=str(work / "metrics.json"),
            plots_dir=str(work / "plots"),
        )
        params["mlflow"].update(
            tracking_uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=str(work / "art")
        )
        path = work / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        env = service_env(work)
        subprocess.run(["adaptad", "prepare", "--params", str(path)], cwd=REPO, env=env, check=True)
        rows = []
        walls = {}
        for method in args.methods:
            cmd = ["adaptad", "pipeline", "--params", str(path), "-S", f"method={method}"]
            for o in args.overrides:
                cmd += ["-S", o]
            cmd += ["-S", f"pipeline.runs_dir={work / 'runs' / method}"]
            out, wall, peak = run_measured(cmd, cwd=REPO, env=env)
            walls[method] = (wall, peak)
            if out.returncode != 0:
                sys.exit(f"{method} failed:\n{out.stderr[-4000:]}")
            for run in (work / "runs" / method).iterdir():
                if not (run / "evaluation" / "metrics.json").is_file():
                    continue  # a dataset-wide training folder (topology)
                record = json.loads((run / "evaluation" / "metrics.json").read_text())
                train = json.loads((run / "evaluation" / "train.json").read_text())
                history = json.loads((run / "evaluation" / "history.json").read_text())
                best = history[-1].get("best_epoch") if history else None
                rows.append({"category": record["category"], "method": method, "metrics": record["metrics"],
                             "training": train, "kept": best, "wall": wall, "peak_gib": peak})  # fmt: skip
        print(f"backbone {params['backbone']} @ {params['image_size']} px, weights {params['weights']}")
        print(
            "| data set | method | image AUROC | pixel AUROC | AUPRO | epochs | kept | collapsed | "
            "train s | eval s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["category"], r["method"])):
            m, t = r["metrics"], r["training"]
            collapsed = f"epoch {t['collapsed']['epoch']}" if t.get("collapsed") else "no" if t else "-"
            kept = r["kept"] if r["kept"] is not None else "-"
            print(
                f"| {r['category']} | {r['method']} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                f"{m['aupro']:.3f} | {t.get('epochs', '-')} | {kept} | {collapsed} | "
                f"{t.get('seconds', 0):.0f} | {m['evaluate_seconds']:.0f} |"
            )
        for method, (wall, peak) in walls.items():
            print(
                f"{method}: pipeline run over {len(args.categories)} data sets {wall:.0f} s, "
                f"peak memory {peak:.1f} GiB"
            )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
