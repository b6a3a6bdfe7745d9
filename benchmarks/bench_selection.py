"""Selection regret of the fine-tuned methods (issue 20, item 3), from finished runs.

Runs trained with ``train.record_epochs: true`` hold ``selection.json`` beside their ``metrics.json``
(flows/evaluate.py): per epoch, the label-free signal the method selected on and — measured after
training, never seen by it — the test image AUROC of that epoch's weights. This script gathers every such
run under the given folders and prints, per job and per method and data set: the kept epoch, the best
epoch by test AUROC, the regret (best − kept test image AUROC) and how often epoch 0 was kept.

    .venv/bin/python benchmarks/bench_selection.py /work/evidence/runs/selection/jobs \
        --out benchmarks/evidence/selection/regret.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.selection import regret_table  # noqa: E402


def gather(folders: list[Path]) -> list[dict]:
    """One record per run: its identity (metrics.json) and its selection.json."""
    records = []
    for folder in folders:
        for path in sorted(folder.glob("**/selection.json")):
            identity = json.loads((path.parent / "metrics.json").read_text())
            record = json.loads(path.read_text())
            keys = ("dataset", "category", "method", "run_key")
            records.append({k: identity[k] for k in keys} | record)
    return records


def markdown(records: list[dict]) -> str:
    lines = [
        "| data | category | method | signal | last epoch | kept | best | kept AUROC | best AUROC | regret |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["method"], r["dataset"], r["category"])):
        lines.append(
            f"| {r['dataset']} | {r['category']} | {r['method']} | {r['signal']} "
            f"| {r['epochs'][-1]['epoch']} "
            f"| {r['kept_epoch']} | {r['best_test_epoch']} | {r['kept_test_image_auroc']:.3f} "
            f"| {r['best_test_image_auroc']:.3f} | {r['regret']:.3f} |"
        )
    lines += [
        "",
        "| method · data | runs | mean regret | max regret | kept the best | kept epoch 0 "
        "| mean kept AUROC | mean best AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in regret_table(records, lambda r: f"{r['method']} · {r['dataset']}"):
        lines.append(
            f"| {g['group']} | {g['runs']} | {g['mean_regret']:.3f} | {g['max_regret']:.3f} "
            f"| {g['kept_best']} of {g['runs']} | {g['kept_epoch_0']} of {g['runs']} "
            f"| {g['mean_kept_auroc']:.3f} | {g['mean_best_auroc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders to search for selection.json")
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    args = parser.parse_args()
    records = gather(args.folders)
    if not records:
        raise SystemExit(
            f"no selection.json under {', '.join(map(str, args.folders))}: train with "
            "train.record_epochs: true"
        )
    text = markdown(records)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
