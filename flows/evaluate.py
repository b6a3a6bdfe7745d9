"""One category's evaluation with a (possibly adapted) backbone, written as a run folder.

A run folder (``runs/categories/<run key>/``) appears atomically, complete or not at all:

- ``method/``        the fitted method (spec.json, <network>.safetensors, memory/ with faiss banks)
- ``metrics.json``   image/pixel AUROC, AUPRO@0.3, F1-max, timings, and the run's identity
- ``scores.parquet`` per-image scores; ``roc.csv`` / ``pro.csv`` curves; ``heatmaps.png``, ``curves.png``
- ``history.json``   per-epoch training signals; ``train.json`` training summary and tags
- ``selection.json`` only when training recorded every epoch's weights (``train.record_epochs``): per
                     epoch the selection signal and the test image AUROC, the kept epoch, the regret
- ``examples/``      the same few test images for every method of the category (images, masks, this
                     method's maps; components.plots.comparison_examples) for side-by-side heat maps

``metrics.json`` also records the evaluation's peak resident memory (``peak_rss_mb``: the process that ran
it, sampled by a thread every 20 ms) and, on a GPU, the CUDA allocator's peak (``peak_cuda_mb``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from components.atomic import replace_dir
from components.data import Sample
from components.evaluation import fit_and_evaluate
from components.methods import MethodSpec, build_method, load_networks
from components.metrics import METRIC_KEYS, pro_curve_table, roc_curve_table
from components.plots import comparison_examples, curves_plot, heatmap_grid, save_examples
from components.selection import epoch_test_aurocs, selection_record


@dataclass
class CategoryJob:
    """What to evaluate: identity of the run, the method, the samples and where the trained weights are."""

    dataset: str
    category: str
    run_key: str
    data_version: str
    spec: MethodSpec
    train: Sequence[Sample]
    test: Sequence[Sample]
    masks: bool = True
    batch_size: int = 16
    loader_workers: int = 1
    trained: Path | None = None  # folder with the trained networks (<name>.safetensors) of the training job
    training: dict[str, Any] = field(default_factory=dict)  # summary: epochs, tags, history, ...


def _write_csv(columns: dict[str, np.ndarray], path: Path) -> None:
    pcsv.write_csv(pa.table({k: np.asarray(v, np.float64) for k, v in columns.items()}), path)


class PeakMemory:
    """Peak resident set size (MB) of this process while the block runs, sampled by a thread every 20 ms.

    On a CUDA device the allocator's own peak is read as well (``cuda_mb``; None on the CPU).
    """

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self._stop = threading.Event()
        self.before_mb = self.peak_mb = self._rss()
        self.cuda_mb: float | None = None

    def _rss(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __enter__(self) -> PeakMemory:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    def metrics(self) -> dict[str, float]:
        out = {"peak_rss_mb": self.peak_mb, "rss_before_mb": self.before_mb}
        return out | ({"peak_cuda_mb": self.cuda_mb} if self.cuda_mb is not None else {})


def evaluate_category(job: CategoryJob, directory: str | Path, device: str | None = None) -> dict[str, Any]:
    """Fit the method on the category's train images, evaluate the test split, write the run folder.

    A run the collapse monitor stopped is not evaluated (its model is discarded, the test split stays
    untouched): its folder records the training only, with NaN test metrics.
    """
    t0 = time.perf_counter()
    training_metrics = {
        "train_seconds": float(job.training.get("seconds", 0.0)),
        "epochs": float(job.training.get("epochs", 0)),
    }
    identity = {
        "dataset": job.dataset,
        "category": job.category,
        "run_key": job.run_key,
        "data_version": job.data_version,
        "method": job.spec.method,
        "spec": job.spec.to_json(),
        "collapsed": job.training.get("collapsed"),  # the collapse monitor's verdict, None when healthy
    }
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if identity["collapsed"]:
            metrics = dict.fromkeys(METRIC_KEYS, float("nan")) | training_metrics
        else:
            with PeakMemory() as memory:
                metrics = _evaluate_into(job, tmp, device, identity)
            metrics |= training_metrics | memory.metrics()
        metrics["evaluate_seconds"] = time.perf_counter() - t0
        (tmp / "history.json").write_text(json.dumps(job.training.get("history", []), indent=2))
        (tmp / "train.json").write_text(
            json.dumps({k: v for k, v in job.training.items() if k != "history"}, indent=2)
        )
        (tmp / "metrics.json").write_text(
            json.dumps(identity | {"metrics": metrics}, indent=2, allow_nan=True)
        )
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return identity | {"metrics": metrics}


def _evaluate_into(job: CategoryJob, tmp: Path, device: str | None, identity: dict[str, Any]) -> dict:
    """Fit + score + metrics; writes the method, scores, curves and figures into ``tmp``."""
    method = build_method(job.spec, device, progress=False)
    if job.trained is not None:
        load_networks(method, job.trained)
    method.extractor.eval()
    result = fit_and_evaluate(method, job.train, job.test, job.batch_size, job.loader_workers, job.masks)
    identity["spec"] |= {"levels": list(method.extractor.levels)}
    identity["device"] = str(method.device)
    labels = np.array([s.label for s in job.test])
    metrics: dict[str, Any] = {k: float(result.metrics[k]) for k in METRIC_KEYS}
    metrics |= {k: float(v) for k, v in result.timings.items()}
    method.save(tmp / "method")
    pq.write_table(result.table(), tmp / "scores.parquet")
    roc = roc_curve_table(result.scores, labels)
    _write_csv({"fpr": roc["fpr"], "tpr": roc["tpr"]}, tmp / "roc.csv")
    pro = pro_curve_table(result.maps, result.masks) if job.masks and result.masks.any() else None
    if pro is not None:
        _write_csv(pro, tmp / "pro.csv")
    spec = job.spec
    title = f"{job.dataset}/{job.category} · {spec.method} · {spec.backbone} @ {spec.image_size}px"
    heatmap_grid(result.samples, result.scores, result.maps, result.masks, tmp / "heatmaps.png", title=title)
    curves_plot(roc, pro, metrics, tmp / "curves.png", title=title)
    examples = comparison_examples(result.samples)
    save_examples(tmp / "examples", result.samples, result.maps, result.masks, examples)
    if job.trained is not None and job.training.get("epoch_weights"):
        t0 = time.perf_counter()
        record = _selection(job, method)
        (tmp / "selection.json").write_text(json.dumps(record, indent=2))
        metrics |= {
            "kept_epoch": float(record["kept_epoch"]),
            "best_test_epoch": float(record["best_test_epoch"]),
            "selection_regret": record["regret"],
            "selection_seconds": time.perf_counter() - t0,
        }
    return metrics


def _selection(job: CategoryJob, method) -> dict[str, Any]:
    """Test image AUROC of every recorded epoch (after training, never seen by it) and the regret of
    the epoch the method kept (components.selection); runs last: it reloads the method's weights."""
    assert job.trained is not None
    folder = job.trained / job.training["epoch_weights"]
    epochs = {int(d.name): d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()}
    aurocs = epoch_test_aurocs(method, epochs, job.train, job.test, job.batch_size, job.loader_workers)
    return selection_record(
        aurocs,
        job.training.get("history", []),
        int(job.training["kept_epoch"]),
        job.training.get("selection_signal"),
        job.training.get("pretrained_signal"),
    )


def read_run(directory: str | Path) -> dict[str, Any] | None:
    """The metrics.json of a finished run folder, or None when the folder is absent."""
    path = Path(directory) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def evaluate_in_ray_task(job: CategoryJob, directory: str, threads: int) -> dict[str, Any]:
    """:func:`evaluate_category` inside a Ray task (importable by workers: flows may load by file path)."""
    import torch

    torch.set_num_threads(threads)
    return evaluate_category(job, directory)
