"""Run the real grid flow several times in ONE process (one Prefect API, one local Ray cluster), so the
grid's integration test pays the service start-up once. Prints one JSON line per step.

    python -m tests.grid_runner PARAMS_YAML STEPS_JSON

A step is ``{"name", "overrides", "move": [[src, dst], ...], "kill": SUBSTRING, "plan": bool}``: the files
are moved before the flow runs (hiding or restoring data); ``kill`` SIGKILLs, once, the first Ray worker whose
title (``ray::<task name>``) contains it — a job lost mid-run; ``plan``
prints the dry-run table instead of running. After each step the grid output folder is copied to
``<output>.<name>``, and the step's line records the MLflow runs and the run folders' metrics.json mtimes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


def _killer(pattern: str, stop: threading.Event, killed: list[str]) -> None:
    import psutil

    while not stop.wait(0.2):
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            # only a Ray worker's title (not a forked child of this process, still holding its command line)
            if cmdline.startswith("ray::") and pattern in cmdline:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(cmdline)
                return


def _snapshot(params_path: str, overrides: dict) -> dict:
    import mlflow

    from flows.params import load_params

    params = load_params(params_path, overrides)
    runs = Path(params.grid.runs_dir)
    folders = {p.parent.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/evaluation/metrics.json")}
    client = mlflow.MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("adaptad-grid")
    rows = []
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            rows.append({"id": run.info.run_id, "status": run.info.status, "tags": run.data.tags})
    artifact = None
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        with get_client(sync_client=True) as prefect:
            found = prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["grid-leaderboard"])),
                sort=ArtifactSort.CREATED_DESC,
            )
            artifact = {"count": len(found), "latest": found[0].data if found else None}
    except Exception as err:  # reported, not hidden
        artifact = {"error": repr(err)}
    output = Path(params.grid.output)
    return {"folders": folders, "mlflow": rows, "artifact": artifact, "output": str(output)}


def main(params_path: str, steps: str) -> int:
    from flows.cli import _embedded_defaults

    _embedded_defaults()
    from flows.grid import dry_run, expand, run_grid
    from flows.params import load_params

    for step in json.loads(steps):
        overrides = step.get("overrides") or {}
        for src, dst in step.get("move") or []:
            os.replace(src, dst)
        killed: list[str] = []
        stop = threading.Event()
        if step.get("kill"):
            threading.Thread(target=_killer, args=(step["kill"], stop, killed), daemon=True).start()
        t0 = time.perf_counter()
        result, error = None, None
        try:
            if step.get("plan"):
                result = dry_run(expand(load_params(params_path, overrides), params_path))
            else:
                result = run_grid(params_path, overrides)
        except Exception as err:
            error = f"{type(err).__name__}: {' '.join(str(err).split())}"
        stop.set()
        seconds = time.perf_counter() - t0
        snap = _snapshot(params_path, overrides)
        output = Path(snap["output"])
        if output.is_dir() and not step.get("plan"):
            shutil.copytree(output, output.with_name(f"{output.name}.{step['name']}"), dirs_exist_ok=True)
        line = {"name": step["name"], "result": result, "error": error, "seconds": seconds, "killed": killed}
        print("GRID-RESULT " + json.dumps(line | snap, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
