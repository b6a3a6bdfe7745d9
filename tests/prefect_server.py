"""One real Prefect server for a whole test session (conftest.py's ``service_env`` points flows at it).

A module of its own: pytest imports conftest.py as ``conftest`` while the tests import ``tests.conftest``;
the server's state must be one for both (the session-end hook stops what the tests started).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_PREFECT: dict = {}


def shared_prefect_api() -> str:
    """The URL of one real Prefect server (``prefect server start``, sqlite, its own home) for the session.

    A flow process without ``PREFECT_API_URL`` starts a temporary server of its own, migrating a fresh
    database: 10-18 s per process here, most of the time of a small pipeline run. The tests' flow
    processes talk to this one instead; the tests of the temporary server's own life (the grid's SIGTERM /
    SIGKILL tests, the first ``dvc repro``) go on starting theirs (``temporary_prefect``).
    """
    if "url" not in _PREFECT:
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        home = Path(tempfile.mkdtemp(prefix="adaptad-tests-prefect-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        log = (home / "server.log").open("w")
        command = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1"]
        server = subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _PREFECT.update(server=server, home=home, log=log)
        url, deadline = f"http://127.0.0.1:{port}/api", time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the tests' Prefect server did not start: {home / 'server.log'}"
                    ) from None
                time.sleep(0.3)
        _PREFECT["url"] = url
    return _PREFECT["url"]


def stop_shared_prefect() -> None:
    """Stop the session's Prefect server (its whole process group) and remove its home."""
    import signal
    import subprocess

    server = _PREFECT.pop("server", None)
    if server is None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    _PREFECT.pop("log").close()
    shutil.rmtree(_PREFECT.pop("home"), ignore_errors=True)


def temporary_prefect(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the shared Prefect API: a flow process started with it runs its own temporary
    server (in its ``PREFECT_HOME``), as a user's first ``adaptad pipeline`` does."""
    return {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
