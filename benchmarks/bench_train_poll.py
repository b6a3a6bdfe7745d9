"""Seconds a trivial Ray Train job takes at Ray's worker-poll interval and at adaptad's (flows/cli.py).

Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s)
and sees a run's end only at its next poll; adaptad's CLI sets 0.5 s unless the user set it. Each interval
runs in a process of its own (a local Ray cluster of 2 CPUs), which fits a 2-worker ``TorchTrainer`` whose
loop only reports once, ``--fits`` times. Printed per fit: ``fit()``'s seconds, and the seconds from the
loop's end to ``fit()`` returning (what the interval changes; the rest is Ray starting the controller and
the worker processes).

    .venv/bin/python benchmarks/bench_train_poll.py --intervals 2 0.5 --fits 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _loop(config: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:  # Ray Train keeps metrics reported with a checkpoint
        (Path(folder) / "done").write_text("1")
        rank0 = ray.train.get_context().get_world_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank0 else None
        ray.train.report({"loop_end": time.time()}, checkpoint=checkpoint)


def _fits(count: int) -> list[dict[str, float]]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(count):
            start = time.time()
            result = TorchTrainer(
                _loop,
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"poll-{i}", storage_path=storage),
            ).fit()
            end = time.time()
            rows.append({"fit_s": end - start, "loop_end_to_return_s": end - result.metrics["loop_end"]})
    ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[2.0, 0.5])
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_fits(args.fits)))
        return
    for interval in args.intervals:
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(interval), "RAY_AUTH_MODE": "disabled"}
        out = subprocess.run(
            [sys.executable, __file__, "--one", "--fits", str(args.fits)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = json.loads(out.strip().splitlines()[-1])
        fits = " ".join(f"{r['fit_s']:.1f}" for r in rows)
        ends = " ".join(f"{r['loop_end_to_return_s']:.1f}" for r in rows)
        print(f"interval {interval:>4} s: fit() {fits} s; loop end -> fit() returned {ends} s")


if __name__ == "__main__":
    main()
