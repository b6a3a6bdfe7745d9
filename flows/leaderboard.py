"""The grid's leaderboard: per dataset and category, every method's metrics (mean ± std over seeds),
times, throughput and peak memory; as markdown, parquet, DVC metrics/plots and side-by-side heat maps.

Inputs are the jobs' run folders (flows/evaluate.py ``metrics.json`` and ``examples/``), so a leaderboard
can be rebuilt from finished runs alone. Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.atomic import replace_dir, write_text_atomic
from components.metrics import METRIC_KEYS
from components.plots import load_examples, method_comparison
from flows.params import adapted_name

#: the test figures at a job's own thresholds (flows/decide.py; None for a job run without them)
OPERATING = ("image_fpr", "image_recall", "image_precision", "image_f1", "pixel_f1")
#: quality metrics aggregated as mean ± std over seeds (std: population, 0 for one seed)
QUALITY = METRIC_KEYS + OPERATING
#: cost columns (mean over seeds; peak memory: max over seeds)
COST = ("fit_seconds", "inference_seconds", "images_per_second", "peak_rss_mb", "peak_cuda_mb")
JOB_COLUMNS = (
    "dataset",
    "category",
    "method",
    "backbone",
    "image_size",
    "seed",
    "run_key",
    "shared_key",  # the dataset-wide training job a dataset-scope method's categories share (else None)
    "status",
    "reason",
    "attempts",
    "reused",
    "mlflow_run_id",
)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def job_row(record: dict[str, Any]) -> dict[str, Any]:
    """One job's row: identity, status and the numbers of its metrics.json (None where absent)."""
    m = (record.get("metrics") or {}) | (record.get("decision") or {})
    row = {k: record.get(k) for k in JOB_COLUMNS}
    row["method"] = adapted_name(row["method"], record.get("adapted_by"))  # on an adapted backbone
    row |= {k: _num(m.get(k)) for k in QUALITY}
    train, fit = _num(m.get("train_seconds")) or 0.0, _num(m.get("fit_seconds"))
    row["train_seconds"] = train
    row["fit_seconds"] = None if fit is None else train + fit  # training (Ray) + banks / Gaussians
    row["inference_seconds"] = _num(m.get("predict_seconds"))
    row["images_per_second"] = _num(m.get("predict_images_per_second"))
    row["peak_rss_mb"] = _num(m.get("peak_rss_mb"))
    row["peak_cuda_mb"] = _num(m.get("peak_cuda_mb"))
    row["evaluate_seconds"] = _num(m.get("evaluate_seconds"))
    row["test_images"] = _num(m.get("test_images"))
    row["collapsed"] = bool(record.get("collapsed"))
    return row


def variant_label(row: dict[str, Any]) -> str:
    return f"{row['method']} · {row['backbone']} @ {row['image_size']}px"


def board(jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished jobs grouped by (dataset, category, method, backbone, image size), aggregated over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in jobs:
        if row["status"] == "done":
            key = (row["dataset"], row["category"], row["method"], row["backbone"], row["image_size"])
            groups.setdefault(key, []).append(row)
    out = []
    for (dataset, category, method, backbone, size), rows in groups.items():
        entry: dict[str, Any] = {
            "dataset": dataset,
            "category": category,
            "method": method,
            "backbone": backbone,
            "image_size": size,
            "seeds": len(rows),
            "collapsed": sum(r["collapsed"] for r in rows),
            "run_keys": [r["run_key"] for r in rows],
        }
        for k in QUALITY:
            values = [r[k] for r in rows if r[k] is not None]
            entry[f"{k}_mean"] = float(np.mean(values)) if values else None
            entry[f"{k}_std"] = float(np.std(values)) if values else None
        for k in COST:
            values = [r[k] for r in rows if r[k] is not None]
            agg = max if k.startswith("peak") else (lambda v: float(np.mean(v)))
            entry[k] = float(agg(values)) if values else None
        out.append(entry)
    rank = lambda e: -(e["image_auroc_mean"] if e["image_auroc_mean"] is not None else -1)  # noqa: E731
    return sorted(out, key=lambda e: (e["dataset"], e["category"], rank(e), e["method"]))


def _mean_std(entry: dict[str, Any], k: str) -> str:
    mean, std = entry.get(f"{k}_mean"), entry.get(f"{k}_std")
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if entry.get("seeds", 1) > 1 else f"{mean:.3f}"


def _cost(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean_over_categories(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["method"], e["backbone"], e["image_size"]), []).append(e)
    out = []
    for (method, backbone, size), rows in groups.items():
        entry: dict[str, Any] = {
            "method": method,
            "backbone": backbone,
            "image_size": size,
            "categories": len(rows),
        }
        for k in QUALITY:
            values = [r[f"{k}_mean"] for r in rows if r[f"{k}_mean"] is not None]
            entry[f"{k}_mean"] = float(np.mean(values)) if values else None
        for k in COST:
            values = [r[k] for r in rows if r[k] is not None]
            entry[k] = (max(values) if k.startswith("peak") else float(np.mean(values))) if values else None
        out.append(entry)
    return sorted(out, key=lambda e: -(e["image_auroc_mean"] if e["image_auroc_mean"] is not None else -1))


SHOWN = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_fpr", "image_recall")
HEADER = (
    "| image AUROC | pixel AUROC | AUPRO | image F1-max | FPR at threshold | recall at threshold "
    "| fit s | inference s | images/s | peak RSS MB |"
)


def markdown(entries: list[dict[str, Any]], jobs: Sequence[dict[str, Any]], summary: str) -> str:
    """The leaderboard as markdown: one section per dataset, best image AUROC first in each category."""
    lines = ["# adaptad grid leaderboard", "", summary, ""]
    gpu = any(e.get("peak_cuda_mb") for e in entries)
    header = HEADER + (" peak GPU MB |" if gpu else "")
    cols = 10 + gpu

    def costs(e: dict[str, Any]) -> str:
        cells = [
            _cost(e["fit_seconds"]),
            _cost(e["inference_seconds"]),
            _cost(e["images_per_second"]),
            _cost(e["peak_rss_mb"], 0),
        ]
        return " | ".join(cells + ([_cost(e.get("peak_cuda_mb"), 0)] if gpu else []))

    for dataset in dict.fromkeys(e["dataset"] for e in entries):
        rows = [e for e in entries if e["dataset"] == dataset]
        lines += [f"## {dataset}", "", "| category | method | seeds " + header, "|---" * (cols + 3) + "|"]
        best: dict[str, float] = {}
        for e in rows:
            if e["image_auroc_mean"] is not None:
                best[e["category"]] = max(best.get(e["category"], -1.0), e["image_auroc_mean"])
        for e in rows:
            quality = [_mean_std(e, k) for k in SHOWN]
            if e["image_auroc_mean"] is not None and e["image_auroc_mean"] == best.get(e["category"]):
                quality[0] = f"**{quality[0]}**"
            note = f" (collapsed ×{e['collapsed']})" if e["collapsed"] else ""
            lines.append(
                f"| {e['category']} | {variant_label(e)}{note} | {e['seeds']} | "
                + " | ".join(quality)
                + f" | {costs(e)} |"
            )
        categories = {e["category"] for e in rows}
        if len(categories) > 1:
            lines += [
                "",
                f"**Mean over the {len(categories)} categories**",
                "",
                "| method | categories " + header,
                "|---" * (cols + 2) + "|",
            ]
            for e in _mean_over_categories(rows):
                quality = [_cost(e[f"{k}_mean"], 3) for k in SHOWN]
                lines.append(
                    f"| {variant_label(e)} | {e['categories']} | " + " | ".join(quality) + f" | {costs(e)} |"
                )
        lines.append("")
    failed = [j for j in jobs if j["status"] != "done"]
    if failed:
        lines += ["## Failed jobs", "", "| dataset | category | method | seed | attempts | reason |"]
        lines.append("|---|---|---|---|---|---|")
        for j in failed:
            lines.append(
                f"| {j['dataset']} | {j['category']} | {variant_label(j)} | {j['seed']} | "
                f"{j['attempts']} | {j['reason']} |"
            )
        lines.append("")
    lines.append(
        "FPR / recall at threshold: the test split at the job's own thresholds, set on held-out normal "
        "train images (decision in params.yaml; — for a job run without them); "
        "fit s: training (Ray Train) + banks/Gaussians; inference s and images/s: scoring the test split; "
        "peak RSS: the evaluation process's resident memory (max over seeds)."
    )
    return "\n".join(lines)


def _write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with open(fd, "wb") as f:
            pq.write_table(pa.Table.from_pylist(list(rows)), f)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def comparison_figures(jobs: Sequence[dict[str, Any]], runs_dir: str | Path, folder: Path) -> list[Path]:
    """One PNG per (dataset, category): the same test images under every method (the lowest seed)."""
    chosen: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for j in sorted(jobs, key=lambda j: j["seed"]):
        if j["status"] != "done" or j["collapsed"]:
            continue
        per = chosen.setdefault((j["dataset"], j["category"]), {})
        per.setdefault(variant_label(j), j)
    written = []
    for (dataset, category), variants in chosen.items():
        columns = []
        for label, j in variants.items():
            examples = load_examples(Path(runs_dir) / j["run_key"] / "evaluation" / "examples")
            if examples is not None:
                columns.append((label.replace(" · ", "\n", 1), examples))
        path = folder / f"{_slug(dataset)}__{_slug(category)}.png"
        if method_comparison(columns, path, title=f"{dataset}/{category}: the same test images"):
            written.append(path)
    return written


def dvc_metrics(entries: list[dict[str, Any]], jobs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """metrics/grid.json: per dataset, category and variant the means (and stds) and costs."""
    doc: dict[str, Any] = {
        "jobs": len(jobs),
        "done": sum(j["status"] == "done" for j in jobs),
        "failed": sum(j["status"] != "done" for j in jobs),
        "datasets": {},
    }
    for e in entries:
        variant = f"{e['method']}-{e['backbone']}-{e['image_size']}"
        values = {f"{k}_mean": e[f"{k}_mean"] for k in QUALITY} | {f"{k}_std": e[f"{k}_std"] for k in QUALITY}
        values |= {k: e[k] for k in COST if e[k] is not None} | {"seeds": e["seeds"]}
        doc["datasets"].setdefault(e["dataset"], {}).setdefault(e["category"], {})[variant] = values
    return doc


def write(
    jobs: Sequence[dict[str, Any]],
    summary: str,
    *,
    runs_dir: str | Path,
    output: str | Path,
    metrics_file: str | Path,
    plots_dir: str | Path,
) -> dict[str, Any]:
    """Write every leaderboard output; returns their paths, the markdown and the leaderboard rows."""
    output, plots = Path(output), Path(plots_dir)
    entries = board(jobs)
    text = markdown(entries, jobs, summary)
    output.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    _write_parquet(jobs, output / "jobs.parquet")
    _write_parquet(entries, output / "leaderboard.parquet")
    write_text_atomic(output / "leaderboard.md", text + "\n")
    write_text_atomic(metrics_file, json.dumps(dvc_metrics(entries, jobs), indent=2))
    tmp = Path(tempfile.mkdtemp(prefix=".heatmaps.", dir=output))  # same filesystem: rename is atomic
    tmp_plots = Path(tempfile.mkdtemp(prefix=".grid.", dir=plots))
    try:
        figures = comparison_figures(jobs, runs_dir, tmp)
        (tmp_plots / "heatmaps").mkdir()
        for figure in figures:
            shutil.copy(figure, tmp_plots / "heatmaps" / figure.name)
        rows = [
            {
                "job": f"{e['dataset']}/{e['category']} · {variant_label(e)}",
                "dataset": e["dataset"],
                "category": e["category"],
                "variant": variant_label(e),
                **{k: e[f"{k}_mean"] for k in QUALITY},
            }
            for e in entries
        ]
        table = pa.Table.from_pylist(rows) if rows else pa.table({"job": pa.array([], pa.string())})
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, tmp_plots / "leaderboard.csv")
        replace_dir(tmp, output / "heatmaps")
        for name in ("leaderboard.csv", "heatmaps"):
            target = plots / name
            if (tmp_plots / name).is_dir():
                replace_dir(tmp_plots / name, target)
            else:
                (tmp_plots / name).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_plots, ignore_errors=True)
    return {
        "markdown": text,
        "leaderboard": entries,
        "files": [
            output / "leaderboard.md",
            output / "leaderboard.parquet",
            output / "jobs.parquet",
            *sorted((output / "heatmaps").glob("*.png")),
        ],
    }
