"""Run the real pipeline flow several times in ONE process (one Prefect API, one local Ray cluster), so
integration tests of several methods pay the service start-up once. Prints one JSON line per run.

    python -m tests.flow_runner PARAMS_YAML '[{"method": "gaussian_ft"}, {"method": "panda_oe"}]'
"""

from __future__ import annotations

import json
import sys
import time


def main(params_path: str, runs: str) -> int:
    from flows.cli import _embedded_defaults

    _embedded_defaults()
    from flows.stages import run_pipeline

    for overrides in json.loads(runs):
        t0 = time.perf_counter()
        try:
            result, error = run_pipeline(params_path, overrides), None
        except Exception as err:
            result, error = None, f"{type(err).__name__}: {' '.join(str(err).split())}"
        line = {"overrides": overrides, "result": result, "error": error, "seconds": time.perf_counter() - t0}
        print("FLOW-RESULT " + json.dumps(line, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
