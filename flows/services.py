"""Start-up of the embedded services, overlapped with the work that precedes the first flow call.

Kept free of heavy imports (torch, ray, mlflow, Prefect's server) so that it can start before them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

SERVER_APP = "prefect.server.api.server:create_app"  # Prefect's API, as its temporary server runs it

# Environment defaults for the worker processes of a Ray cluster this process starts (they inherit it).
# A worker scores with torch and faiss, each with its own OpenMP runtime (torch's libgomp, faiss' bundled
# copy) whose idle threads spin by default. Alternating small torch and faiss calls then keeps one spinning
# thread per runtime beside the working ones; on a machine whose cores the task takes exactly, Ray's
# niced workers lose those cores to every wake-up of the driver and the Prefect API, and the tiny parallel
# regions wait for descheduled threads. Measured on 2 cores (DN2, Fashion-MNIST 64 px): 54 -> 318 test
# images/s with PASSIVE, scores bit-identical (benchmarks/RESULTS.md). A value set by the user wins.
WORKER_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


_STOP_HANDLER: list = []


def install_stop_handler(handler) -> None:
    """Make ``handler`` this process's SIGINT and SIGTERM handler (main thread only; see
    :func:`restore_stop_handler`)."""
    _STOP_HANDLER[:] = [handler]
    restore_stop_handler()


def restore_stop_handler() -> None:
    """Re-install the handler of :func:`install_stop_handler` after ``ray.init``, which sets its own SIGTERM
    handler in a driver (``sys.exit``: the flow would then wait on its job threads)."""
    if _STOP_HANDLER and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _STOP_HANDLER[0])


def cancel_current_flow_run(message: str, timeout: float = 5.0) -> None:
    """Mark the flow run this (main) thread is inside — and its unfinished task runs — ``Cancelled`` on the
    Prefect API, so that a stopped run does not stay ``Running`` there. Called from a stop handler, which
    exits right after: the API calls run in a thread given ``timeout`` seconds, in this thread's context
    (the flow run and the API URL are context variables). Nothing happens outside a flow run.

    The API records task runs from the client's events, asynchronously: the events sent so far are
    delivered first, and the unfinished task runs are read and cancelled again until two reads in a row
    find none (a task run recorded after a read is caught by the next)."""
    import contextvars

    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    flow_run_id = context.flow_run.id
    deadline = time.monotonic() + timeout

    def cancel() -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            TaskRunFilter,
            TaskRunFilterState,
            TaskRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.events.worker import EventsWorker
        from prefect.states import Cancelled

        EventsWorker.drain_all(timeout=max(0.0, deadline - time.monotonic()) / 2)
        unfinished = TaskRunFilter(
            state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
            )
        )
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
            empty_reads = 0
            while empty_reads < 2 and time.monotonic() < deadline:
                task_runs = client.read_task_runs(flow_run_filter=this_run, task_run_filter=unfinished)
                for task_run in task_runs:
                    client.set_task_run_state(task_run.id, Cancelled(message=message), force=True)
                empty_reads = 0 if task_runs else empty_reads + 1
                time.sleep(0.25)

    context_run = contextvars.copy_context().run

    def guarded() -> None:
        with contextlib.suppress(Exception):  # the stop goes on when the API does not answer
            context_run(cancel)

    thread = threading.Thread(target=guarded, name="cancel-flow-run", daemon=True)
    thread.start()
    thread.join(timeout)


def worker_env_defaults() -> None:
    """Set :data:`WORKER_ENV_DEFAULTS` where unset; call before starting a local Ray cluster."""
    for name, value in WORKER_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


class PrefectAPIStarter:
    """Starts the embedded Prefect API — the server Prefect's own temporary mode would start — at once,
    in a background thread, and points the flow calls at it (:meth:`active`).

    It is Prefect's own ASGI app (``prefect.server.api.server:create_app``) under uvicorn in a subprocess,
    with the settings Prefect's ``SubprocessASGIServer`` gives it (no UI, ephemeral: no background
    services). Launched here directly, the driver never imports Prefect's server package (≈ 6 CPU-s on
    this machine); the server comes up (≈ 8 s, longer on a never-migrated PREFECT_HOME database) while
    this process imports torch, checks its inputs and starts Ray. The subprocess is stopped at exit.
    Nothing starts when PREFECT_API_URL names a server (environment or active Prefect profile); if the
    start fails, the flow call falls back to Prefect's own temporary server and reports its error.

    ``env`` is added to the server's environment (e.g. a ``PREFECT_HOME`` of its own); ``timeout``, the
    seconds to wait for its ``/health`` (default: Prefect's ephemeral start-up timeout).
    """

    def __init__(self, env: dict[str, str] | None = None, timeout: float | None = None) -> None:
        self.api_url: str | None = None
        self._env = env or {}
        self._timeout = timeout
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        if not os.environ.get("PREFECT_API_URL"):
            self._thread = threading.Thread(target=self._start, name="prefect-api-start", daemon=True)
            self._thread.start()

    def _start(self) -> None:
        import prefect
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            get_current_settings,
        )

        if PREFECT_API_URL.value():  # a server named in the active Prefect profile
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **self._env,
        }
        app = ["--app-dir", str(prefect.__module_path__.parent), "--factory", SERVER_APP]
        where = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *app, *where], env=env, stdout=subprocess.DEVNULL
        )
        atexit.register(self.stop)
        url = f"http://127.0.0.1:{port}/api"
        timeout = self._timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    self.api_url = url
                    return
            time.sleep(0.1)
        self.stop()  # not up in time: the flow call starts Prefect's own and reports why

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Wait for the server, then run the enclosed flow calls against it."""
        self.wait()
        if self.api_url is None:
            yield
            return
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def stop(self) -> bool:
        """Stop the server if it runs; whether it did."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return False
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return True
