"""``adaptad calibrate``: new thresholds for a registered model from a folder of new normal images, with no
retraining — the line was re-lit, a camera moved, the false-alarm budget changed.

The model's own method folder (weights and memory) scores the images; they are new, so none of them is
in the memory that scores them. The thresholds (components/decision.py) are registered as a NEW version
of the same model: the same method folder, the new decision.json, the source version's test metrics and
tags, and a description that says what changed. It gets the alias ``challenger``; promotion goes through
``adaptad promote`` as for any other version. The figures at the new thresholds on the test split are not
known here (no test images), so that version's ``image_fpr`` / ``image_recall`` tags are ``nan`` and a
promotion gate on them refuses it until it is evaluated.

Bad input — no images, an unreadable one, fewer than the rule needs, an unknown model — is refused with
the file or count named, before anything is logged or registered.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from flows.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model URI, e.g. models:/NAME@champion")
    parser.add_argument(
        "--images", required=True, type=Path, help="folder of new NORMAL images (searched recursively)"
    )
    add_decision_arguments(parser)
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rule``, ``--false-alarm-rate``, ``--synthetic``: how thresholds are set (components.decision)."""
    parser.add_argument(
        "--rule", default="normal_quantile", choices=("normal_quantile", "synthetic_f1"), help="decision rule"
    )
    parser.add_argument(
        "--false-alarm-rate", type=float, default=0.05, help="normal_quantile: share of normal images above"
    )
    parser.add_argument(
        "--synthetic",
        nargs="*",
        default=["cutpaste", "noise"],
        help="synthetic anomaly kinds made from the normal images (synthetic_f1's positives)",
    )


def calibrate_command(args: argparse.Namespace) -> dict[str, Any]:
    """Execute ``adaptad calibrate``; returns ``{"model_name", "version", "source_version", ...}``."""
    from components.data import DataError, build_manifest, scan_image_folder, synthetic_anomalies
    from components.decision import CalibrationError, calibrate, required_normals
    from flows.predict import open_registry

    try:
        need = required_normals(args.rule, args.false_alarm_rate)
        images = scan_image_folder(args.images, "--images")
        build_manifest(images, workers=1)  # every image decodes before anything else starts
    except (DataError, CalibrationError) as err:
        raise UsageError(str(err)) from None
    if len(images) < need:
        raise UsageError(
            f"--images {args.images}: {len(images)} images; rule {args.rule} at false-alarm rate "
            f"{args.false_alarm_rate} needs at least {need}"
        )
    source = open_registry(args.tracking_uri, args.model)
    if source is None:
        raise UsageError(f"--model {args.model}: name a registered version or alias (models:/NAME@champion)")

    import mlflow
    from mlflow import MlflowClient

    from components.evaluation import loader, score_all
    from components.methods import load_method

    with tempfile.TemporaryDirectory(prefix="adaptad-calibrate-") as scratch:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(f"models:/{source.name}/{source.version}", dst_path=scratch)
        )
        method_dir = model_dir / "artifacts" / "method"
        method = load_method(method_dir)
        size = method.image_size
        scores, maps, _ = score_all(method, loader(images, size, 16, 0))
        fakes = synthetic_anomalies(images, args.synthetic) if args.synthetic else []
        fake = score_all(method, loader(fakes, size, 16, 0)) if fakes else (None, None, None)
        del method
        try:
            calibration = calibrate(args.rule, scores, maps, *fake, false_alarm_rate=args.false_alarm_rate)
        except CalibrationError as err:
            raise UsageError(f"--images {args.images}: {err}") from None
        client = MlflowClient()
        run = client.get_run(source.run_id)
        doc = {
            "run_key": source.tags.get("run_key"),
            "calibration": calibration.to_dict(),
            "metrics": {
                "image_threshold": calibration.image.value,
                "pixel_threshold": calibration.pixel.value,
            },
            "recalibrated": {
                "from_version": str(source.version),
                "images": str(args.images.resolve()),
                "count": len(images),
            },
        }
        decision = Path(scratch) / "decision.json"
        decision.write_text(json.dumps(doc, indent=2))
        return _register(client, source, run, method_dir, images[0].path, decision, doc)


def _register(
    client, source, run, method_dir: Path, example: str, decision: Path, doc: dict
) -> dict[str, Any]:
    """Log the method folder with the new decision in a run beside the source's; register it as challenger."""
    import mlflow

    from components.decision import DECISION_METRICS
    from flows.pyfunc import log_pyfunc
    from flows.tracking import MODEL_URI_TAG, operating_point_markdown, register_version, run_link

    c, n, folder = doc["calibration"], doc["recalibrated"]["count"], doc["recalibrated"]["images"]
    note = (
        f"Re-calibrated from version {source.version} on {n} new normal images in `{folder}`:"
        " the same weights and memory, new thresholds, no retraining."
    )
    tags = {k: v for k, v in (source.tags or {}).items() if not k.startswith("promotion.")}
    tags |= {k: "nan" for k in DECISION_METRICS} | {
        "image_threshold": repr(c["image"]["value"]),
        "pixel_threshold": repr(c["pixel"]["value"]),
        "recalibrated_from": str(source.version),
    }
    experiment = run.info.experiment_id
    run_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    run_tags |= {"recalibrated_from": str(source.version), "mlflow.note.content": note}
    with mlflow.start_run(
        experiment_id=experiment, run_name=f"{run.info.run_name}-recalibrated", tags=run_tags
    ):
        mlflow.log_params({f"decision.{k}": c[k] for k in ("rule", "false_alarm_rate")} | {"images": n})
        mlflow.log_metrics({k: float(doc["metrics"][k]) for k in ("image_threshold", "pixel_threshold")})
        mlflow.log_artifact(str(decision))
        info = log_pyfunc(method_dir, example, decision=decision)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        run_id = mlflow.active_run().info.run_id
    description = (
        f"## Re-calibrated version of {source.name} v{source.version}\n\n{note}\n\n"
        f"{operating_point_markdown(doc)}"
        f"The figures at the new thresholds on the test split are unknown until it is evaluated.\n\n"
        f"**Run** [{run.info.run_name}-recalibrated]({run_link(experiment, run_id)})\n\n---\n\n"
        f"{source.description or ''}"
    )
    version = register_version(client, source.name, info.model_uri, tags, description)
    return {
        "model_name": source.name,
        "version": version,
        "source_version": str(source.version),
        "images": n,
        "image_threshold": c["image"]["value"],
        "pixel_threshold": c["pixel"]["value"],
        "held_out_false_alarm_rate": c["held_out_false_alarm_rate"],
    }
