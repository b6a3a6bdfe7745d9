"""One real Prefect server for a whole test session (conftest.py's ``service_env`` points flows at it).

A module of its own: pytest imports conftest.py as ``conftest`` while the tests import ``tests.conftest``;
the server's state must be one for both (the session-end hook stops what the tests started).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from flows.services import PrefectAPIStarter

_PREFECT: dict = {}
START_TIMEOUT = 180.0  # seconds: a fresh database is migrated first, slowly on a busy machine


def shared_prefect_api() -> str:
    """The URL of one real Prefect API server (sqlite, its own home) for the session.

    A flow process without ``PREFECT_API_URL`` starts a temporary server of its own, migrating a fresh
    database: 10-18 s per process here, most of the time of a small pipeline run. The tests' flow
    processes talk to this one instead — the server adaptad's CLI starts (``PrefectAPIStarter``) — and the
    tests of the temporary server's own life (the grid's SIGTERM / SIGKILL tests, the first ``dvc repro``)
    go on starting theirs (``temporary_prefect``).
    """
    if "url" not in _PREFECT:
        home = Path(tempfile.mkdtemp(prefix="adaptad-tests-prefect-"))
        env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        starter = PrefectAPIStarter(env=env, timeout=START_TIMEOUT)
        _PREFECT.update(starter=starter, home=home)
        starter.wait()
        if starter.api_url is None:
            raise RuntimeError(
                f"the tests' Prefect server did not answer within {START_TIMEOUT:.0f} s (PREFECT_HOME "
                f"{home}; its errors are on stderr above), or PREFECT_API_URL names a server already"
            )
        _PREFECT["url"] = starter.api_url
    return _PREFECT["url"]


def stop_shared_prefect() -> None:
    """Stop the session's Prefect server and remove its home."""
    starter = _PREFECT.pop("starter", None)
    if starter is None:
        return
    starter.stop()
    _PREFECT.pop("url", None)
    shutil.rmtree(_PREFECT.pop("home"), ignore_errors=True)


def temporary_prefect(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the shared Prefect API: a flow process started with it runs its own temporary
    server (in its ``PREFECT_HOME``), as a user's first ``adaptad pipeline`` does."""
    return {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
