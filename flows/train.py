"""The one generic Ray Train loop: it drives any method through the method protocol.

Every worker builds the method from its MethodSpec, wraps the method's trainable module with
``prepare_model`` (DDP over gloo on CPU, NCCL on GPU) and shards the training images with
``prepare_data_loader``. Rank 0 writes a checkpoint every epoch (backbone weights, optimizer state,
the method's own state, the epoch history); when a worker dies, Ray restarts the group (up to
``FailureConfig(max_failures)``) and every worker resumes from the last checkpoint. The run is named by
the run key under ``storage_path``, so a driver restarted with the same key resumes too.

The loop never knows which method it trains; the method never knows it runs under Ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.atomic import replace_dir
from components.data import ImageDataset, Sample, split_validation, synthetic_anomalies
from components.evaluation import loader
from components.methods import MethodSpec, build_method, load_networks, save_networks
from components.monitor import CollapseMonitor, CollapseThresholds

CHECKPOINT_FILES = ("optimizer.pt", "method.pt", "monitor.pt", "progress.json")  # + <network>.safetensors


@dataclass
class TrainJob:
    """A training job for one category (or a whole dataset): what to train, on what, and how."""

    run_key: str
    spec: MethodSpec
    train: list[Sample]
    seed: int = 0
    batch_size: int = 16
    val_fraction: float = 0.2
    synthetic: tuple[str, ...] = ("cutpaste", "noise")
    loader_workers: int = 0
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool | str = "auto"
    max_failures: int = 2
    storage: str = "runs/ray"
    #: how Ray places the DDP ranks on the cluster's nodes: PACK (fewest nodes) or SPREAD (one per node
    #: where it can, e.g. to use several machines); soft, so a group that loses a node fits on the others
    placement_strategy: str = "PACK"
    #: collapse monitor thresholds (CollapseThresholds fields); None switches the monitor off
    collapse: dict[str, Any] | None = field(default_factory=dict)
    #: keep every epoch's weights (``epochs/<epoch>/`` in the output) so that the evaluation can measure
    #: the test AUROC of each epoch after training: the selection regret (never seen by the method)
    record_epochs: bool = False


@dataclass
class TrainResult:
    """Where the adapted backbone lies and what happened: epochs, history, tags, restarts, seconds."""

    directory: Path
    summary: dict[str, Any] = field(default_factory=dict)


def absolute(sample: Sample) -> Sample:
    """``sample`` with absolute image and mask paths."""
    mask = os.path.abspath(sample.mask_path) if sample.mask_path else None
    return dataclasses.replace(sample, path=os.path.abspath(sample.path), mask_path=mask)


def _split(job: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """Training images and the validation slice (held-out normal + synthetic anomalies made from them)."""
    samples = [Sample(**s) for s in job["train"]]
    fit, held_out = split_validation(samples, job["val_fraction"], seed=job["seed"])
    return fit, held_out + synthetic_anomalies(held_out, job["synthetic"])


def _save_checkpoint(directory: Path, method, optimizer, monitor, progress: dict[str, Any]) -> None:
    save_networks(method, directory)
    torch.save(optimizer.state_dict() if optimizer is not None else {}, directory / "optimizer.pt")
    torch.save(method.state_dict(), directory / "method.pt")
    torch.save(monitor.state_dict() if monitor is not None else {}, directory / "monitor.pt")
    (directory / "progress.json").write_text(json.dumps(progress))


def _snapshot(directory: Path, epoch: int, method) -> None:
    """Write ``method``'s networks as ``directory/<epoch>/`` (whole or not at all)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{epoch}.", dir=directory))
    try:
        save_networks(method, tmp)
        replace_dir(tmp, directory / str(epoch))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_over_ranks(value: float) -> float:
    if _distributed():
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / torch.distributed.get_world_size()
    return value


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks stop together)."""
    if _distributed():
        t = torch.tensor([float(flag)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
    return flag


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (see module docstring)."""
    import ray.train
    import ray.train.torch

    job = config["job"]
    torch.set_num_threads(job["cpus_per_worker"])
    torch.manual_seed(job["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    spec = MethodSpec.from_json(job["spec"])
    method = build_method(spec, device, progress=False)
    fit, validation = _split(job)
    size, bs, nw = spec.image_size, job["batch_size"], job["loader_workers"]
    val_loader = loader(validation, size, bs, nw)

    monitor = None if job["collapse"] is None else CollapseMonitor(CollapseThresholds(**job["collapse"]))
    snapshots = Path(job["epoch_weights"]) if job.get("epoch_weights") and rank == 0 else None
    progress: dict[str, Any] = {"epoch": 0, "history": [], "tags": {}, "restarts": 0, "final": False}
    checkpoint = ray.train.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            method.load_state_dict(torch.load(ckpt / "method.pt", weights_only=True))  # may build modules
            load_networks(method, ckpt)
            if monitor is not None:
                monitor.load_state_dict(torch.load(ckpt / "monitor.pt", weights_only=True))
            optimizer_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
            progress = json.loads((ckpt / "progress.json").read_text())
        progress["restarts"] += 1
        progress["resumed_from_epoch"] = progress["epoch"]
    else:
        t_begin = time.perf_counter()
        with method.sharing_monitor_features():  # the pretrained features once for method and monitor
            progress["tags"] = method.begin_training(loader(fit, size, bs, nw), val_loader)
            if monitor is not None:
                first = monitor.begin(method.monitor_features, loader(fit, size, bs, nw), val_loader)
                progress["monitor"] = [{"epoch": 0, **first.metrics}]
        progress["begin_seconds"] = time.perf_counter() - t_begin
        progress["pretrained_signal"] = method.pretrained_signal
        if snapshots is not None and method.epoch0_candidate:
            _snapshot(snapshots, 0, method)

    model = ray.train.torch.prepare_model(method.trainable())
    optimizer = method.make_optimizer()
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    train_loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(
            ImageDataset(fit, size), batch_size=bs, shuffle=True, num_workers=nw, drop_last=len(fit) > bs
        )
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    method.plan_epochs(len(train_loader))

    def report(final: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(Path(tmp), method, optimizer, monitor, progress)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            last = progress["history"][-1] if progress["history"] else {}
            ray.train.report({**last, "epoch": progress["epoch"], "final": final}, checkpoint=ckpt)

    stop = progress["final"]
    while not stop and progress["epoch"] < method.epochs:
        epoch = progress["epoch"] + 1
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        method.begin_epoch(epoch, len(train_loader))
        method.train_mode()
        t0, total, batches = time.perf_counter(), 0.0, 0
        for batch in train_loader:
            loss = method.training_loss(batch, model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if method.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, method.max_grad_norm)
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        train_seconds = time.perf_counter() - t0
        collapsed = False
        with method.sharing_monitor_features():  # validation and monitor: one forward of the slice
            report_ = method.end_epoch(epoch, val_loader)
            row = {
                "epoch": epoch,
                "loss": _mean_over_ranks(total / max(batches, 1)),
                "epoch_seconds": time.perf_counter() - t0,
                "train_seconds": train_seconds,
                **report_.metrics,
            }
            if monitor is not None:
                t_watch = time.perf_counter()
                watch = monitor.measure(method.monitor_features, val_loader)
                row |= {f"monitor/{k}": v for k, v in watch.metrics.items()}
                row["monitor_seconds"] = time.perf_counter() - t_watch
                progress["monitor"].append({"epoch": epoch, **watch.metrics})
                collapsed = _any_rank(watch.collapsed)
                if collapsed:
                    reason = watch.reason or "collapse on another rank"
                    progress["collapsed"] = {"epoch": epoch, "reason": reason}
        progress["history"].append(row)
        progress["epoch"] = epoch
        if snapshots is not None:
            _snapshot(snapshots, epoch, method)
        stop = _any_rank(report_.stop) or collapsed
        if report_.stop:
            progress["stopped_early"] = True
        report(final=False)
    if not progress["final"]:
        progress["kept_epoch"] = method.kept_epoch(progress["epoch"])
        progress["selection_signal"] = method.selection_signal
        method.end_training()
        progress["final"] = True
        report(final=True)


def _use_gpu(setting: bool | str) -> bool:
    import ray

    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def storage_uri(storage: str) -> str:
    """Ray Train storage: a URI (s3://, gs://, ...) as given, a local path made absolute."""
    return storage if "://" in storage else str(Path(storage).resolve())


_RAY_LOCK = threading.Lock()


def ensure_ray() -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start (or reuse) a local cluster. Thread-safe.

    Call it from a thread that outlives the work (the flow's main thread): Ray ties the local cluster's
    processes to the thread that started them (PR_SET_PDEATHSIG).
    """
    import ray

    with _RAY_LOCK:
        if not ray.is_initialized():
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, include_dashboard=False
            )


def train(job: TrainJob, output: Path) -> TrainResult:
    """Run ``job`` on the Ray cluster; copy the final adapted backbone and summary to ``output``.

    ``output`` appears atomically (every network's ``<name>.safetensors`` + summary.json). A finished
    output is reused.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    output = Path(output)
    if job.collapse is not None:
        CollapseThresholds(**job.collapse)  # a bad threshold name fails here, not in a worker
    if (output / "summary.json").is_file():
        return TrainResult(output, json.loads((output / "summary.json").read_text()))
    epoch_weights = None
    if job.record_epochs:
        if "://" in job.storage:
            raise ValueError(
                f"train.record_epochs needs train.storage to be a folder every node sees, not {job.storage}"
            )
        epoch_weights = Path(storage_uri(job.storage)) / job.run_key / "epoch_weights"
    ensure_ray()
    use_gpu = _use_gpu(job.use_gpu)
    payload = {
        **{k: v for k, v in job.__dict__.items() if k not in ("spec", "train")},
        "spec": job.spec.to_json(),
        "train": [absolute(s).__dict__ for s in job.train],  # workers may run in another folder
        "synthetic": list(job.synthetic),
        "epoch_weights": str(epoch_weights) if epoch_weights else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": payload},
        scaling_config=ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=job.placement_strategy,
        ),
        run_config=RunConfig(
            name=job.run_key,
            storage_path=storage_uri(job.storage),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.run_key}: finished without a checkpoint")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        with result.checkpoint.as_directory() as ckpt:
            progress = json.loads((Path(ckpt) / "progress.json").read_text())
            if not progress.get("final"):
                raise RuntimeError(f"training run {job.run_key}: last checkpoint is not final")
            for network in Path(ckpt).glob("*.safetensors"):
                shutil.copy(network, tmp / network.name)
        if epoch_weights is not None:
            _collect_epochs(epoch_weights, progress, tmp / "epochs", job.run_key)
        summary = {
            "epochs": progress["epoch"],
            "history": progress["history"],
            "tags": progress["tags"],
            "restarts": progress["restarts"],
            "stopped_early": progress.get("stopped_early", False),
            "collapsed": progress.get("collapsed"),
            "monitor": progress.get("monitor", []),
            "begin_seconds": progress.get("begin_seconds", 0.0),
            "kept_epoch": progress.get("kept_epoch"),
            "selection_signal": progress.get("selection_signal"),
            "pretrained_signal": progress.get("pretrained_signal"),
            **({"epoch_weights": "epochs"} if epoch_weights is not None else {}),
            "seconds": time.perf_counter() - t0,
            "workers": job.num_workers,
            "use_gpu": use_gpu,
            "ray_run": f"{storage_uri(job.storage).rstrip('/')}/{job.run_key}",
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult(output, summary)


def _collect_epochs(source: Path, progress: dict[str, Any], target: Path, run_key: str) -> None:
    """Copy the snapshots of the epochs this run trained (``0..epoch``; 0 where recorded) to ``target``."""
    first = 0 if (source / "0").is_dir() else 1
    missing = [e for e in range(first, progress["epoch"] + 1) if not (source / str(e)).is_dir()]
    if missing:
        raise RuntimeError(f"training run {run_key}: no weights recorded for epochs {missing} in {source}")
    for epoch in range(first, progress["epoch"] + 1):
        shutil.copytree(source / str(epoch), target / str(epoch))
