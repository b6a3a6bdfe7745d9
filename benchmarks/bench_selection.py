"""Selection regret of the fine-tuned methods (issue 20, item 3), from finished runs.

Runs trained with ``train.record_epochs: true`` hold ``selection.json`` beside their ``metrics.json``
(flows/evaluate.py): per epoch, the label-free signal the method selected on and — measured after
training, never seen by it — the test image AUROC of that epoch's weights. This script gathers every such
run under the given folders and prints, per job and per method and data set: the kept epoch, the best
epoch by test AUROC, the regret (best − kept test image AUROC) and how often epoch 0 was kept.

Where runs of one (data set, category, method) differ only in method knobs (e.g. lr), ``--tune`` also
replays the label-free search of flows/tune.py over them: each run is a trial, the trial with the best
validation signal at its kept epoch is chosen (components/selection.py ``trial_signal``, ``choose_trial``,
the functions Ray Tune's search uses), and the regret with tuning is the best test AUROC over every
trial's epochs minus the chosen trial's kept one.

    .venv/bin/python benchmarks/bench_selection.py /work/evidence/runs/selection/jobs \
        --out benchmarks/evidence/selection/regret.md [--tune]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.selection import choose_trial, regret_table, trial_signal  # noqa: E402


def gather(folders: list[Path]) -> list[dict]:
    """One record per run: its identity (metrics.json) and its selection.json."""
    records = []
    for folder in folders:
        for path in sorted(folder.glob("**/selection.json")):
            identity = json.loads((path.parent / "metrics.json").read_text())
            record = json.loads(path.read_text())
            keys = ("dataset", "category", "method", "run_key")
            summary = json.loads((path.parent / "train.json").read_text())  # the run folder keeps the
            summary["history"] = json.loads((path.parent / "history.json").read_text())  # history apart
            # a method that keeps its last epoch (TPTL, ReContrast's default) has no signal to tune on
            signal = trial_signal(summary) if summary.get("selection_signal") else None
            extra = {"knobs": identity["spec"]["params"], "trial_signal": signal}
            records.append({k: identity[k] for k in keys} | record | extra)
    return records


def replay_tune(records: list[dict]) -> list[dict]:
    """Per (data set, category, method) with runs that differ in knobs: every run as a trial, the choice
    of flows/tune.py, the regret of each trial alone and with tuning."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["category"], r["method"]), []).append(r)
    out = []
    for (dataset, category, method), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        varied = sorted(k for k in rs[0]["knobs"] if len({json.dumps(r["knobs"].get(k)) for r in rs}) > 1)
        rs = sorted(rs, key=lambda r: json.dumps([r["knobs"].get(k) for k in varied]))
        chosen = rs[choose_trial([r["trial_signal"] for r in rs])]
        best = max(r["best_test_image_auroc"] for r in rs)
        out.append(
            {
                "dataset": dataset,
                "category": category,
                "method": method,
                "trials": [
                    {
                        "knobs": {k: r["knobs"].get(k) for k in varied},
                        "signal": r["trial_signal"],
                        "kept": r["kept_test_image_auroc"],
                        "best": r["best_test_image_auroc"],
                        "regret": r["regret"],
                    }
                    for r in rs
                ],
                "chosen": {k: chosen["knobs"].get(k) for k in varied},
                "tuned_kept": chosen["kept_test_image_auroc"],
                "tuned_best": best,
                "tuned_regret": best - chosen["kept_test_image_auroc"],
            }
        )
    return out


def _label(knobs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in knobs.items())


def tune_markdown(rows: list[dict]) -> str:
    lines = [
        "| data | category | method | trial (knobs) | signal at kept epoch "
        "| kept AUROC | best AUROC | regret |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for t in row["trials"]:
            knobs = _label(t["knobs"])
            mark = " (chosen)" if t["knobs"] == row["chosen"] else ""
            signal = "—" if t["signal"] is None else f"{t['signal']:.4f}"
            lines.append(
                f"| {row['dataset']} | {row['category']} | {row['method']} | {knobs}{mark} | {signal} "
                f"| {t['kept']:.3f} | {t['best']:.3f} | {t['regret']:.3f} |"
            )
        lines.append(
            f"| {row['dataset']} | {row['category']} | {row['method']} | **tuned** | | "
            f"**{row['tuned_kept']:.3f}** | {row['tuned_best']:.3f} | **{row['tuned_regret']:.3f}** |"
        )
    lines += [
        "",
        "| method · data | sets | mean kept AUROC per trial | tuned: mean kept AUROC | mean regret |",
    ]
    lines.append("|---|---|---|---|---|")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['method']} · {row['dataset']}", []).append(row)
    for name, rs in groups.items():
        per_trial: dict[str, list[float]] = {}
        for row in rs:
            for t in row["trials"]:
                per_trial.setdefault(_label(t["knobs"]), []).append(t["kept"])
        trials = "; ".join(f"{k}: {np.mean(v):.4f}" for k, v in per_trial.items())
        mean = np.mean([row["tuned_kept"] for row in rs])
        regret = np.mean([row["tuned_regret"] for row in rs])
        lines.append(f"| {name} | {len(rs)} | {trials} | {mean:.4f} | {regret:.4f} |")
    return "\n".join(lines) + "\n"


def _epoch0(record: dict) -> float:
    """The test image AUROC at epoch 0: the method's scorer on the weights it starts from (no training)."""
    return next(e["test_image_auroc"] for e in record["epochs"] if int(e["epoch"]) == 0)


def markdown(records: list[dict]) -> str:
    lines = [
        "| data | category | method | signal | last epoch | kept | best | epoch 0 AUROC | kept AUROC "
        "| best AUROC | regret |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["method"], r["dataset"], r["category"])):
        lines.append(
            f"| {r['dataset']} | {r['category']} | {r['method']} | {r['signal']} "
            f"| {r['epochs'][-1]['epoch']} "
            f"| {r['kept_epoch']} | {r['best_test_epoch']} | {_epoch0(r):.3f} "
            f"| {r['kept_test_image_auroc']:.3f} | {r['best_test_image_auroc']:.3f} | {r['regret']:.3f} |"
        )
    lines += [
        "",
        "| method · data | runs | mean regret | max regret | kept the best | kept epoch 0 "
        "| mean epoch 0 AUROC | mean kept AUROC | mean best AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    epoch0: dict[str, list[float]] = {}
    for r in records:
        epoch0.setdefault(f"{r['method']} · {r['dataset']}", []).append(_epoch0(r))
    for g in regret_table(records, lambda r: f"{r['method']} · {r['dataset']}"):
        lines.append(
            f"| {g['group']} | {g['runs']} | {g['mean_regret']:.3f} | {g['max_regret']:.3f} "
            f"| {g['kept_best']} of {g['runs']} | {g['kept_epoch_0']} of {g['runs']} "
            f"| {np.mean(epoch0[g['group']]):.3f} | {g['mean_kept_auroc']:.3f} | {g['mean_best_auroc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders to search for selection.json")
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    parser.add_argument(
        "--tune", action="store_true", help="replay the tune search over runs that differ in knobs"
    )
    args = parser.parse_args()
    records = gather(args.folders)
    if not records:
        raise SystemExit(
            f"no selection.json under {', '.join(map(str, args.folders))}: train with "
            "train.record_epochs: true"
        )
    text = markdown(records)
    if args.tune:
        text += "\n" + tune_markdown(replay_tune(records))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
