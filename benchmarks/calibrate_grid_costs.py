"""The grid cost model's factors as finished runs imply them (flows/grid.py, "Cost estimate").

Usage: .venv/bin/python benchmarks/calibrate_grid_costs.py RUNS_DIR [--cpus 2] [--num-workers 2]
Reads every ``RUNS_DIR/<run key>/evaluation/metrics.json`` (a grid's ``runs_dir``) and prints, per method
(median over runs, in units of ``c``, the model's seconds per image of the backbone at that size on
``--cpus`` cores): FIT_FACTOR = fit seconds / (train images × c), PREDICT_FACTOR = predict seconds /
(test images × c), TRAIN_FACTOR = (train seconds − TRAIN_SETUP_SECONDS) / (epochs × train images × 3c ×
cpus / num_workers) — next to the factors flows/grid.py uses now.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.grid import (
    FIT_FACTOR,
    PREDICT_FACTOR,
    TRAIN_FACTOR,
    TRAIN_SETUP_SECONDS,
    seconds_per_image,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", type=Path)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of each job (grid.cpus_per_job)")
    ap.add_argument("--num-workers", type=int, default=2, help="train.num_workers of the runs")
    args = ap.parse_args()
    factors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(args.runs_dir.glob("*/evaluation/metrics.json")):
        record = json.loads(path.read_text())
        spec, m = record["spec"], record["metrics"]
        if record.get("collapsed") or not m.get("train_images"):  # stopped by the collapse monitor
            continue
        c = seconds_per_image(spec["backbone"], int(spec["image_size"]), args.cpus)
        f = factors[spec["method"]]
        if m.get("fit_seconds") is not None:
            f["fit"].append(m["fit_seconds"] / (m["train_images"] * c))
        if m.get("test_images"):
            f["predict"].append(m["predict_seconds"] / (m["test_images"] * c))
        if m.get("epochs") and m.get("train_seconds"):
            per = 3 * c * args.cpus / args.num_workers
            f["train"].append(
                (m["train_seconds"] - TRAIN_SETUP_SECONDS) / (m["epochs"] * m["train_images"] * per)
            )
    print(f"{'method':<12} {'runs':>4}  {'fit (now)':>14}  {'predict (now)':>14}  {'train (now)':>14}")
    for method, f in sorted(factors.items()):
        cells = []
        for name, table in (("fit", FIT_FACTOR), ("predict", PREDICT_FACTOR), ("train", TRAIN_FACTOR)):
            value = f"{statistics.median(f[name]):.2f}" if f[name] else "-"
            cells.append(f"{value} ({table.get(method, 1.0):.1f})".rjust(14))
        print(f"{method:<12} {len(f['fit']):>4}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
