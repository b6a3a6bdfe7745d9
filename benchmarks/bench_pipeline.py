"""Time `dvc repro` of the demo from a clean state, stage by stage, with the embedded services.

Usage: .venv/bin/python benchmarks/bench_pipeline.py [-S KEY=VALUE ...]
Copies the working tree to a temporary folder (like a fresh clone), runs `dvc repro -s` for each stage
in order and prints the wall time of each stage, the compute inside the pipeline stage (training
epochs, the method's one-time set-up, banks + evaluation) and the rest: orchestration overhead
(Prefect, Ray and MLflow start-up and bookkeeping, process start, imports).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import repo_copy, service_env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="params.yaml KEY=VALUE")
    parser.add_argument("--log", type=Path, default=None, help="write the stages' output to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptad-bench-") as tmp:
        home = Path(tmp)
        repo = repo_copy(home / "repo")
        if args.overrides:
            params = yaml.safe_load((repo / "params.yaml").read_text())
            for item in args.overrides:
                key, _, value = item.partition("=")
                node = params
                *parents, leaf = key.split(".")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = yaml.safe_load(value)
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            subprocess.run(["git", "commit", "-qam", "bench params"], cwd=repo, check=True)
        env = service_env(home)
        walls = {}
        t_all = time.perf_counter()
        for stage in ("prepare@demo", "pipeline", "promote"):
            t0 = time.perf_counter()
            out = subprocess.run(
                ["dvc", "repro", "-s", stage], cwd=repo, env=env, capture_output=True, text=True
            )
            walls[stage] = time.perf_counter() - t0
            if args.log:
                with args.log.open("a") as f:
                    f.write(f"==== {stage} ({walls[stage]:.1f} s)\n{out.stdout}\n{out.stderr}\n")
            if out.returncode != 0:
                sys.exit(f"stage {stage} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        total = time.perf_counter() - t_all
        (run,) = list((repo / "runs" / "categories").iterdir())
        evaluation = json.loads((run / "evaluation" / "metrics.json").read_text())["metrics"]
        trained = run / "trained" / "summary.json"
        summary = json.loads(trained.read_text()) if trained.is_file() else {}
        history = summary.get("history", [])
        epochs = sum(row["epoch_seconds"] + row.get("monitor_seconds", 0.0) for row in history)
        begin = summary.get("begin_seconds", 0.0)
        compute = epochs + begin + evaluation["evaluate_seconds"]
        print(f"dvc repro of the demo, clean state: {total:.1f} s")
        for stage, wall in walls.items():
            print(f"  stage {stage:<14} {wall:6.1f} s")
        print("inside the pipeline stage:")
        ran = f"{summary.get('epochs', 0)} x {summary.get('workers', 0)} DDP workers"
        print(f"  training epochs + collapse monitor ({ran})  {epochs:6.1f} s")
        print(f"  method set-up (centre, Fisher, pretrained validation)  {begin:6.1f} s")
        print(
            f"  Ray Train job wall (trainer.fit)                        {summary.get('seconds', 0.0):6.1f} s"
        )
        ev = evaluation
        parts = f"fit {ev['fit_seconds']:.1f} s, predict {ev['predict_seconds']:.1f} s"
        print(f"  banks + evaluation ({parts})    {ev['evaluate_seconds']:6.1f} s")
        print(
            f"  orchestration overhead (pipeline stage - compute)       {walls['pipeline'] - compute:6.1f} s"
        )
        print(
            f"metrics: image AUROC {ev['image_auroc']:.3f}, pixel AUROC {ev['pixel_auroc']:.3f}, "
            f"AUPRO {ev['aupro']:.3f}"
        )


if __name__ == "__main__":
    main()
