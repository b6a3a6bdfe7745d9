"""Start-up of the embedded services, overlapped with the work that precedes the first flow call.

Kept free of heavy imports (torch, ray, mlflow) so that it can start before them.
"""

from __future__ import annotations

import contextlib
import os
import threading


class PrefectAPIStarter:
    """Starts Prefect's temporary API server (the embedded default) in a background thread.

    The server is a subprocess that takes ≈ 8 s to come up, 22 s on a fresh PREFECT_HOME (database
    migrations; measured on 2 idle cores); started first, it comes up while this process imports torch,
    checks its inputs and starts Ray. :meth:`wait` before the first flow call: Prefect's client then
    finds the same running server (one per process). Nothing happens when PREFECT_API_URL names a server.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        if not os.environ.get("PREFECT_API_URL"):
            self._thread = threading.Thread(target=self._start, name="prefect-api-start", daemon=True)
            self._thread.start()

    @staticmethod
    def _start() -> None:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():  # a server named in the active Prefect profile
            return
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):  # the flow call starts it again and reports the error
            SubprocessASGIServer().start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
