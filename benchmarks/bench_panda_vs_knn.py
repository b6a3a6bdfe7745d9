"""PANDA vs the frozen kNN baseline (DN2) with the same backbone and image size, on each shared
industrial data set, through the real pipeline (`adaptad prepare` + `adaptad pipeline`).

Usage: .venv/bin/python benchmarks/bench_panda_vs_knn.py [--root ../shared/data/industrial] [-S KEY=VALUE ...]
Everything (manifest, runs, MLflow store) goes to a temporary folder; the repo's params.yaml gives the
defaults. Prints image AUROC, pixel AUROC and AUPRO per data set and method, the epoch PANDA's
validation-based early stopping kept, and the wall time of each pipeline run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import service_env  # noqa: E402

CATEGORIES = ["deeppcb", "kolektorsdd", "magnetic_tile"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "industrial")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES)
    parser.add_argument("--methods", nargs="+", default=["dn2", "panda"])
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
        for method in args.methods:
            t0 = time.perf_counter()
            cmd = ["adaptad", "pipeline", "--params", str(path), "-S", f"method={method}"]
            for o in args.overrides:
                cmd += ["-S", o]
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                sys.exit(f"{method} failed:\n{out.stderr[-4000:]}")
            for run in (work / "runs").iterdir():
                record = json.loads((run / "evaluation" / "metrics.json").read_text())
                if record["method"] != method:
                    continue
                trained = run / "trained" / "summary.json"
                summary = json.loads(trained.read_text()) if trained.is_file() else {}
                best = summary.get("history", [{}])[-1].get("best_epoch") if summary else None
                rows.append((record["category"], method, record["metrics"], summary, best, wall))
        print(f"backbone {params['backbone']} @ {params['image_size']} px, weights {params['weights']}")
        print("| data set | method | image AUROC | pixel AUROC | AUPRO | epochs | kept | train s | eval s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for category, method, m, summary, best, _ in sorted(rows, key=lambda r: (r[0], r[1])):
            print(
                f"| {category} | {method} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                f"{m['aupro']:.3f} | "
                f"{summary.get('epochs', '-')} | {best if best is not None else '-'} | "
                f"{summary.get('seconds', 0):.0f} | {m['evaluate_seconds']:.0f} |"
            )
        for method in args.methods:
            walls = {r[5] for r in rows if r[1] == method}
            print(f"{method}: whole pipeline run over {len(args.categories)} data sets {max(walls):.0f} s")


if __name__ == "__main__":
    main()
