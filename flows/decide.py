"""The decision stage: a finished run's image and pixel thresholds, set without test labels, and its test
split's figures at them (components.decision).

The held-out slice of train/good is the one fine-tuning already keeps out of training
(``train.val_fraction``, the same sha256 choice), so its images took no part in the weights. The run's
own memory (bank, Gaussian, gallery) was fitted on every train image, them included; the calibration
scores them with a second memory, fitted on the rest only, then the thresholds apply to the deployed
model (full memory). That memory holds 1 − val_fraction of the images, so its normal scores run a little
higher than the deployed model's: the realized false-alarm rate tends to fall below the target, not
above it.

Written atomically to ``<runs_dir>/<run key>/decision-<decision key>/``:

- ``decision.json``  the rule, both thresholds with their normalization ranges, how many held-out and
                     synthetic images set them, and the test figures at them (``metrics``)
- ``scores.parquet`` the evaluation's per-image scores with ``score_normalized`` and ``predicted`` (0/1)
- ``calibration.parquet`` the scores that set the image threshold: each held-out normal image (label 0)
                     and synthetic anomaly (label 1), so other rules and rates can be read off without
                     scoring again

The decision key hashes the run key, the ``decision`` and slice parameters and this stage's code, so a
new rule or rate gets a folder of its own and the run (trained weights, banks, metrics) is reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.atomic import replace_dir
from components.data import DataError, Sample, split_validation, synthetic_anomalies
from components.decision import Calibration, calibrate, image_operating_point, pixel_f1, required_normals
from components.evaluation import loader, score_all
from components.methods import AnomalyMethod, build_method, load_method, load_networks
from flows.evaluate import CategoryJob

#: the code whose change gives every decision a new key (the run's own code is in its run key)
DECISION_CODE = (Path(__file__), Path(__file__).parents[1] / "components" / "decision.py")


def decision_key(
    run_key: str, decision: dict[str, Any], val_fraction: float, seed: int, synthetic: list
) -> str:
    """Hash of the run key, the decision parameters, the held-out slice's definition and this code."""
    code = hashlib.sha256(b"".join(p.read_bytes() for p in DECISION_CODE)).hexdigest()[:16]
    slice_ = {"val_fraction": val_fraction, "seed": seed, "synthetic": list(synthetic)}
    payload = json.dumps(
        {"run": run_key, "decision": decision, "slice": slice_, "code": code}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def held_out(train: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The images the calibration memory is fitted on, and the held-out normal images it scores."""
    return split_validation(list(train), val_fraction, seed=seed)


PARAM_NAMES = {"rule": "decision.rule", "rate": "decision.false_alarm_rate", "fraction": "train.val_fraction"}
CLI_NAMES = {"rule": "--rule", "rate": "--false-alarm-rate", "fraction": "--val-fraction"}


def check_decision(
    rule: str,
    false_alarm_rate: float,
    val_fraction: float,
    categories: dict[str, list[Sample]],
    where: str,
    names: dict[str, str] = PARAM_NAMES,
) -> None:
    """Refuse, before any work, a category whose held-out slice is too small for the rule (DataError);
    ``names``: what the user calls the three settings (params keys, or the CLI's options)."""
    need = required_normals(rule, false_alarm_rate)
    for category, train in categories.items():
        _, normals = held_out(train, val_fraction, 0)  # the slice's size does not depend on the seed
        if len(normals) < need:
            raise DataError(
                f"{where}: category {category!r}: {names['rule']} {rule} ({names['rate']} {false_alarm_rate})"
                f" needs {need} held-out normal images; {names['fraction']} {val_fraction} holds out"
                f" {len(normals)} of its {len(train)} train images — add train images, raise"
                f" {names['fraction']} or {names['rate']}, or choose another rule"
            )


@dataclass
class HeldOutScores:
    """What a second memory, fitted without the held-out slice, gives the held-out normal images and their
    synthetic stand-ins: each ``score_all`` triple (scores, maps, masks); ``fake`` all None without any."""

    normals: list[Sample]
    fakes: list[Sample]
    normal: tuple
    fake: tuple


def held_out_scores(
    method: AnomalyMethod,
    train: list[Sample],
    val_fraction: float,
    seed: int,
    synthetic: list[str],
    batch_size: int = 16,
    workers: int = 0,
) -> HeldOutScores:
    """Fit ``method`` (a fresh instance, its networks loaded) on the fit part of ``train`` and score the
    held-out normal images and their synthetic anomalies."""
    fit, normals = held_out(train, val_fraction, seed)
    size = method.image_size
    method.fit(loader(fit, size, batch_size, workers))
    normal = score_all(method, loader(normals, size, batch_size, workers))
    fakes = synthetic_anomalies(normals, synthetic)  # the rule's positives, and the normalization's top
    fake = score_all(method, loader(fakes, size, batch_size, workers)) if fakes else (None, None, None)
    return HeldOutScores(normals, fakes, normal, fake)


def calibrate_held_out(
    method: AnomalyMethod,
    train: list[Sample],
    decision: dict[str, Any],
    val_fraction: float,
    seed: int,
    synthetic: list[str],
    batch_size: int = 16,
    workers: int = 0,
) -> tuple[Calibration, pa.Table]:
    """:func:`held_out_scores`, then the thresholds; also returns those scores (path, defect, label,
    score) — the table ``calibration.parquet`` keeps."""
    held = held_out_scores(method, train, val_fraction, seed, synthetic, batch_size, workers)
    calibration = calibrate(
        decision["rule"], *held.normal[:2], *held.fake, false_alarm_rate=decision["false_alarm_rate"]
    )
    samples = held.normals + held.fakes
    scores = np.r_[held.normal[0], [] if held.fake[0] is None else held.fake[0]]
    table = pa.table(
        {
            "path": [s.path for s in samples],
            "defect": [s.defect for s in samples],
            "label": pa.array([s.label for s in samples], pa.int8()),
            "score": pa.array(scores, pa.float32()),
        }
    )
    return calibration, table


def figures_at(
    calibration: Calibration, scores: np.ndarray, labels: np.ndarray, maps=None, masks=None
) -> dict[str, float]:
    """The test split's figures at the thresholds (pixel F1 where ``maps`` and ``masks`` are given)."""
    metrics = {"image_threshold": calibration.image.value, "pixel_threshold": calibration.pixel.value}
    metrics |= image_operating_point(scores, labels, calibration.image)
    metrics["pixel_f1"] = float("nan") if maps is None else pixel_f1(maps, masks, calibration.pixel)
    return metrics


def decide_category(
    job: CategoryJob,
    evaluation: str | Path,
    directory: str | Path,
    decision: dict[str, Any],
    val_fraction: float,
    seed: int,
    synthetic: list[str],
    device: str | None = None,
) -> dict[str, Any]:
    """Calibrate ``job``'s finished run folder ``evaluation`` and write the decision folder ``directory``."""
    t0 = time.perf_counter()
    evaluation = Path(evaluation)
    method = build_method(job.spec, device, progress=False)
    if job.trained is not None:
        load_networks(method, job.trained)
    method.extractor.eval()
    bs, workers = job.batch_size, job.loader_workers
    calibration, held = calibrate_held_out(
        method, job.train, decision, val_fraction, seed, synthetic, bs, workers
    )
    del method
    scores = pq.read_table(evaluation / "scores.parquet")
    score = scores.column("score").to_numpy().astype(np.float64)
    maps = masks = None
    if job.masks:  # the deployed model's test maps at the pixel threshold
        deployed = load_method(evaluation / "method", device)
        _, maps, masks = score_all(deployed, loader(job.test, job.spec.image_size, bs, workers))
    metrics = figures_at(calibration, score, scores.column("label").to_numpy(), maps, masks)
    metrics["decision_seconds"] = time.perf_counter() - t0
    doc = {"run_key": job.run_key, "calibration": calibration.to_dict(), "metrics": metrics}
    _write(Path(directory), doc, decided_scores(scores, calibration), held)
    return doc


def decided_scores(scores: pa.Table, calibration: Calibration) -> pa.Table:
    """A scores table (``score`` column) with ``score_normalized`` and ``predicted`` (0/1) added."""
    score = scores.column("score").to_numpy().astype(np.float64)
    table = scores.append_column("score_normalized", pa.array(calibration.image.normalize(score)))
    return table.append_column("predicted", pa.array(calibration.image.decide(score).astype(np.int8)))


def _write(target: Path, doc: dict, scores: pa.Table, held: pa.Table) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pq.write_table(held, tmp / "calibration.parquet")
        pq.write_table(scores, tmp / "scores.parquet")
        (tmp / "decision.json").write_text(json.dumps(doc, indent=2, allow_nan=True))
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_decision(directory: str | Path) -> dict[str, Any] | None:
    """The decision.json of a finished decision folder, or None."""
    path = Path(directory) / "decision.json"
    return json.loads(path.read_text()) if path.is_file() else None


def decide_in_ray_task(job: CategoryJob, evaluation: str, directory: str, *args: Any) -> dict[str, Any]:
    """:func:`decide_category` inside a Ray task (``args``: decision, val_fraction, seed, synthetic, then
    the task's CPU count)."""
    import torch

    *options, threads = args
    torch.set_num_threads(threads)
    return decide_category(job, evaluation, directory, *options)
