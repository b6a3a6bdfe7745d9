"""PatchCore on the backbones that fine-tuned jobs adapted, against PatchCore on the ImageNet backbone.

The fine-tuned methods score with their papers' scorers (PANDA: kNN on pooled features; ReContrast:
reconstruction distance; TPTL: SPADE-style kNN), and on the industrial sets every one of them trails the
frozen PatchCore. This asks whether the adapted *features* are better patch features: for each finished
fine-tuned job of the evidence grid, the evidence grid's own PatchCore job is run again with
``weights`` = that job's adapted backbone (``evaluation/method/backbone.safetensors``: trained on the
job's fit split only, its epoch kept without test labels) — the real grid, with a runs folder and MLflow
store of its own, no model registered. Printed beside it: the frozen PatchCore of the archived leaderboard
(``benchmarks/evidence/<dataset>/leaderboard.parquet``), the same params and harness.

    export EVIDENCE_OUT=/work/evidence/runs/evidence SHARED_DATA=/work/shared/data  # this machine's
    .venv/bin/python benchmarks/bench_adapted_patchcore.py \\
        --params benchmarks/evidence/params_industrial.yaml --jobs $EVIDENCE_OUT/jobs \\
        --methods recontrast panda --out /tmp/adapted

``--table FILE`` only prints the table of a results file (``benchmarks/evidence/adapted_patchcore/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def fine_tuned_jobs(jobs: Path, dataset: str, methods: list[str], categories: list[str] | None) -> list[dict]:
    """The finished jobs of ``methods`` on ``dataset`` under ``jobs`` (one row each, sorted)."""
    rows = []
    for metrics_file in sorted(jobs.glob("*/evaluation/metrics.json")):
        m = json.loads(metrics_file.read_text())
        backbone = metrics_file.parent / "method" / "backbone.safetensors"
        wanted = m["dataset"] == dataset and m["method"] in methods and not m.get("collapsed")
        if not wanted or not backbone.is_file() or (categories and m["category"] not in categories):
            continue
        rows.append({**{k: m[k] for k in ("category", "method", "run_key")}, "weights": backbone})
    return sorted(rows, key=lambda r: (r["method"], r["category"], r["run_key"]))


def run_patchcore(params: Path, dataset: str, job: dict, out: Path) -> dict:
    """The evidence grid's PatchCore job on ``job``'s adapted backbone; its metrics."""
    where = out / f"{job['method']}-{job['run_key']}"
    overrides = {
        "weights": str(job["weights"]),
        "grid.methods": "[patchcore]",
        "grid.categories": f"{{{dataset}: [{job['category']}]}}",
        "grid.runs_dir": str(where / "jobs"),
        "grid.output": str(where / dataset),
        "grid.metrics_file": str(where / dataset / "grid.json"),
        "grid.plots_dir": str(where / dataset / "plots"),
        "mlflow.tracking_uri": f"sqlite:///{where / 'mlflow.db'}",
        "mlflow.artifact_root": str(where / "mlartifacts"),
        "mlflow.register_versions": "false",
    }
    command = [str(Path(sys.executable).with_name("adaptad")), "grid", "--params", str(params.resolve())]
    for key, value in overrides.items():
        command += ["-S", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=params.parent, env=env, check=True, stdout=subprocess.DEVNULL)
    (metrics_file,) = (where / "jobs").glob("*/evaluation/metrics.json")
    m = json.loads(metrics_file.read_text())
    return {"patchcore_run_key": m["run_key"], **{k: m["metrics"][k] for k in KEYS}}


def frozen_patchcore(dataset: str) -> dict[str, dict]:
    """The archived leaderboard's PatchCore per category."""
    board = pd.read_parquet(REPO / "benchmarks" / "evidence" / dataset / "leaderboard.parquet")
    board = board[board["method"] == "patchcore"]
    return {r["category"]: {k: _number(r[f"{k}_mean"]) for k in KEYS} for _, r in board.iterrows()}


def _number(value) -> float | None:
    """A metric as a float; None where the data set has none (no masks: no pixel AUROC, AUPRO)."""
    return None if value is None or pd.isna(value) else float(value)


def _figures(values) -> str:
    return " / ".join("—" if v is None or pd.isna(v) else f"{v:.3f}" for v in values)


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.jsonl (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def table(rows: list[dict]) -> str:
    """Markdown: per job, frozen vs adapted PatchCore; then the mean per (dataset, adapting method)."""
    lines = [
        "| data | category | adapted by (run key) | frozen PatchCore: image / pixel AUROC / AUPRO "
        "| on the adapted backbone | image AUROC change |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        frozen, adapted = _figures(r["frozen"][k] for k in KEYS), _figures(r[k] for k in KEYS)
        change = r["image_auroc"] - r["frozen"]["image_auroc"]
        lines.append(
            f"| {r['dataset']} | {r['category']} | {r['method']} ({r['run_key']}) | {frozen} | {adapted} | "
            f"{change:+.3f} |"
        )
    lines += ["", "| data · adapted by | categories | frozen PatchCore image AUROC | adapted | mean change |"]
    lines.append("|---|---|---|---|---|")
    frame = pd.DataFrame(
        [
            {
                "group": f"{r['dataset']} · {r['method']}",
                "frozen": r["frozen"]["image_auroc"],
                "adapted": r["image_auroc"],
            }
            for r in rows
        ]
    )
    groups = frame.groupby("group")
    for group, g in groups:
        lines.append(
            f"| {group} | {len(g)} | {g['frozen'].mean():.4f} | {g['adapted'].mean():.4f} | "
            f"{(g['adapted'] - g['frozen']).mean():+.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, help="the evidence grid's params file")
    p.add_argument("--jobs", type=Path, help="the evidence grid's runs folder (its fine-tuned jobs)")
    p.add_argument("--methods", nargs="+", default=["recontrast", "panda", "topology", "gaussian_ft"])
    p.add_argument("--categories", nargs="*")
    p.add_argument("--out", type=Path, help="folder for the new PatchCore jobs and results.jsonl")
    p.add_argument("--table", type=Path, help="only print the table of this results.jsonl")
    args = p.parse_args()
    if args.table:
        print(table(read_rows(args.table)))
        return
    import yaml

    dataset = yaml.safe_load(args.params.read_text())["dataset"]
    frozen = frozen_patchcore(dataset)
    results = args.out / "results.jsonl"
    done = {row["run_key"] for row in read_rows(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    for job in fine_tuned_jobs(args.jobs, dataset, args.methods, args.categories):
        if job["run_key"] in done:
            continue
        row = {"dataset": dataset, **{k: job[k] for k in ("category", "method", "run_key")}}
        row |= run_patchcore(args.params, dataset, job, args.out) | {"frozen": frozen[job["category"]]}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(read_rows(results)))


if __name__ == "__main__":
    main()
