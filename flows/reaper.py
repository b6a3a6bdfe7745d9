"""Nothing adaptad starts outlives it: a watchdog process that ends the driver's leftover descendants.

A driver that starts services (the embedded Prefect API under uvicorn, a local Ray cluster: GCS, raylet,
dashboard and runtime-env agents, workers) ends them in its exit and stop handlers — but SIGKILL and the
kernel's OOM killer run no handler, and Ray's agents do not share the fate of the driver that started
them. :func:`start_reaper` spawns this module as a separate process, in its own session (a signal sent
to the driver's process group does not reach it). Every ``interval`` seconds it records the driver's
descendants (a process is remembered with its start time, so a reused pid is never taken for it). Once
the driver has gone, however it ended, it waits ``grace`` seconds for the normal shutdown, then sends
SIGTERM to every recorded process still alive and to their descendants, and SIGKILL to those left
after another ``grace`` seconds. Processes the driver did not start (a Ray cluster or Prefect server
that ``infra/local/services.sh`` runs, another adaptad) are never touched: they are not its descendants.

    python -m flows.reaper --pid DRIVER_PID [--interval 1] [--grace 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import psutil


def descendants(roots: list[psutil.Process]) -> list[psutil.Process]:
    """The running descendants of ``roots`` (each once)."""
    found: dict[int, psutil.Process] = {}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def watch(pid: int, interval: float = 1.0, grace: float = 5.0) -> list[psutil.Process]:
    """Record ``pid``'s descendants until it ends, then end those left; returns the ones it ended."""
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)  # keeps the start time, which is_running() checks
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    time.sleep(grace)  # a normal exit ends its services itself
    left = [p for p in seen.values() if _running(p)]
    left += [p for p in descendants(left) if p.pid != me and p.pid not in seen]
    ended = list(left)
    for sig in ("terminate", "kill"):
        left = [p for p in left if _running(p)]
        if not left:
            break
        for p in left:
            with contextlib.suppress(psutil.Error):
                getattr(p, sig)()
        _, left = psutil.wait_procs(left, timeout=grace)
    return ended


def _running(p: psutil.Process) -> bool:
    """Still running (not a zombie); False once it is gone, also if it goes while we ask."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_reaper(
    pid: int | None = None, interval: float = 1.0, grace: float = 5.0
) -> subprocess.Popen | None:
    """Spawn the watchdog of ``pid`` (default: this process). Off with ``ADAPTAD_REAPER=0``."""
    if os.environ.get("ADAPTAD_REAPER", "1") == "0":
        return None
    cmd = [sys.executable, "-m", "flows.reaper", "--pid", str(pid or os.getpid())]
    cmd += ["--interval", str(interval), "--grace", str(grace)]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outside the driver's process group: a group's SIGINT / SIGKILL spares it
        close_fds=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_repo_path(), os.getenv("PYTHONPATH")])),
        },
    )


def _repo_path() -> str:
    """The folder holding this package (so ``-m flows.reaper`` imports this copy)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    watch(args.pid, args.interval, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
