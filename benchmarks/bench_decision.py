"""Decisions without test labels (issue 21, item 4): for each rule, the target vs the realized test
false-alarm rate, the recall, and the F1 at the threshold vs the oracle F1-max.

Per data set (``--data industrial:<set>`` or ``fashion_mnist:<class>``) and frozen method (``--methods``,
params.yaml's knobs): the deployed model is fitted on every train image and scores the test split (as the
pipeline's evaluation does); a second memory, fitted without the held-out slice (``train.val_fraction``,
the same sha256 choice as the pipeline), scores the held-out normal images and their synthetic anomalies
(cutpaste, noise) once. Every rule then sets its image and pixel thresholds from those scores alone
(components/decision.py) and is applied to the deployed model's test scores and maps:

- ``normal_quantile`` at false-alarm rates 0.01, 0.05, 0.1 (a rate the held-out slice is too small for
  is reported as such: it needs ⌈1/rate⌉ images);
- ``synthetic_f1``: the best F1 on held-out normals vs their synthetic anomalies.

One JSON line per (data, method, rule) goes to ``--out``; a markdown table is printed.

    .venv/bin/python benchmarks/bench_decision.py --data industrial:kolektorsdd fashion_mnist:trouser \
        --methods patchcore gaussian --out benchmarks/decision/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.data import oneclass_category, scan_mvtec  # noqa: E402
from components.decision import CalibrationError, calibrate  # noqa: E402
from components.evaluation import fit_and_evaluate  # noqa: E402
from components.methods import MethodSpec, build_method  # noqa: E402
from flows.decide import figures_at, held_out_scores  # noqa: E402

RULES = [
    ("normal_quantile", 0.01),
    ("normal_quantile", 0.05),
    ("normal_quantile", 0.1),
    ("synthetic_f1", None),
]
SIZES = {"industrial": 192, "fashion_mnist": 64}


def samples_of(data: str) -> tuple[list, list, bool]:
    """Train and test samples of ``industrial:<set>`` / ``fashion_mnist:<class>``; whether it has masks."""
    group, name = data.split(":", 1)
    if group == "industrial":
        samples = scan_mvtec(REPO.parent / "shared" / "data" / "industrial", name)
    elif group == "fashion_mnist":
        samples = oneclass_category("fashion_mnist", None, name)
    else:
        raise SystemExit(f"--data {data}: expected industrial:<set> or fashion_mnist:<class>")
    train = [s for s in samples if s.split == "train"]
    return train, [s for s in samples if s.split == "test"], group == "industrial"


def run(data: str, method: str, knobs: dict, val_fraction: float, seed: int, batch: int) -> list[dict]:
    train, test, masks = samples_of(data)
    size = SIZES[data.split(":")[0]]
    spec = MethodSpec(method, "tf_efficientnet_lite0", "pypi", None, size, knobs)
    t0 = time.perf_counter()
    deployed = build_method(spec, progress=False)
    result = fit_and_evaluate(deployed, train, test, batch, 0, has_masks=masks)
    del deployed
    t1 = time.perf_counter()
    second = build_method(spec, progress=False)  # the second memory, without the held-out slice
    held = held_out_scores(second, train, val_fraction, seed, ["cutpaste", "noise"], batch)
    normals, fakes, normal, fake = held.normals, held.fakes, held.normal, held.fake
    del second
    t2 = time.perf_counter()
    labels = np.array([s.label for s in test])
    lines = []
    for rule, rate in RULES:
        line = {
            "data": data,
            "method": method,
            "rule": rule,
            "target_fpr": rate,
            "held_out_normal": len(normals),
            "synthetic": len(fakes),
            "image_auroc": result.metrics["image_auroc"],
            "image_f1_max": result.metrics["image_f1_max"],
            "pixel_f1_max": result.metrics["pixel_f1_max"],
            "seconds": {"evaluate": t1 - t0, "calibration_scores": t2 - t1},
        }
        try:
            c = calibrate(rule, normal[0], normal[1], *fake, false_alarm_rate=rate or 0.05)
        except CalibrationError as err:
            lines.append(line | {"skipped": str(err)})
            continue
        maps = (result.maps, result.masks) if masks else (None, None)
        figures = figures_at(c, result.scores, labels, *maps)
        lines.append(line | figures | {"held_out_fpr": c.held_out_false_alarm_rate})
    return lines


def fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(lines: list[dict]) -> str:
    out = [
        "| data | method | rule | target FPR | test FPR | recall | precision | F1 | F1-max | pixel F1 "
        "| pixel F1-max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        rule = r["rule"] if r["target_fpr"] is None else f"{r['rule']} {r['target_fpr']}"
        if "skipped" in r:
            out.append(
                f"| {r['data']} | {r['method']} | {rule} | {fmt(r['target_fpr'])} | {r['skipped']} ||||||"
            )
            continue
        cells = [
            r.get(k) for k in ("image_fpr", "image_recall", "image_precision", "image_f1", "image_f1_max")
        ]
        cells += [r.get("pixel_f1"), r.get("pixel_f1_max")]
        out.append(
            f"| {r['data']} | {r['method']} | {rule} | {fmt(r['target_fpr'])} | "
            + " | ".join(map(fmt, cells))
            + " |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["patchcore", "gaussian"])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="knobs per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = yaml.safe_load(args.params.read_text())
    done = []
    for data in args.data:
        for method in args.methods:
            knobs = params.get("methods", {}).get(method, {})
            lines = run(
                data, method, knobs, params["train"]["val_fraction"], params.get("seed", 0), args.batch
            )
            done += lines
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.writelines(json.dumps(line) + "\n" for line in lines)
            print(table(lines), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
