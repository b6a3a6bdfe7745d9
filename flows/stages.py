"""Entry points of the DVC stages: ``prepare`` (verify a dataset, write its manifest) and ``pipeline``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from components.data import build_manifest, list_categories, oneclass_category, scan_mvtec, write_manifest
from flows.params import load_params


def prepare(params_path: str | Path = "params.yaml", dataset: str | None = None) -> Path:
    """Verify every image and mask of ``dataset``'s categories and write ``manifests/<dataset>.parquet``.

    Raises DataError naming the first bad file; the manifest is written atomically, only on success.
    """
    params = load_params(params_path)
    name = dataset or params.dataset
    if name not in params.datasets:
        from components.data import DataError

        raise DataError(f"--dataset {name!r}: not declared under datasets in {params_path}")
    data = params.datasets[name]
    if data.oneclass:  # every category is a class: its train images normal, the whole test set scored
        from components.data import DataError

        try:
            samples = [
                s
                for c in data.categories
                for s in oneclass_category(
                    data.layout,
                    data.root,
                    c,
                    coarse=data.coarse,
                    limit_train=data.limit_train,
                    limit_test=data.limit_test,
                )
            ]
        except DataError as err:
            raise DataError(f"{params_path}: datasets.{name}: {err}") from None
    else:
        available = list_categories(data.root)
        missing = [c for c in data.categories if c not in available]
        if missing:
            from components.data import DataError

            raise DataError(f"{data.root}: categories {missing} not found (present: {', '.join(available)})")
        samples = [s for c in data.categories for s in scan_mvtec(data.root, c, masks=data.masks)]
    t0 = time.perf_counter()
    table = build_manifest(samples, workers=min(4, os.cpu_count() or 1))
    path = params.manifest_path(name)
    write_manifest(table, path)
    print(
        f"{path}: {table.num_rows} images of {len(data.categories)} categories verified in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return path


def run_pipeline(
    params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, check: bool = True
) -> dict:
    """Run the Prefect pipeline flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set)."""
    # Prefect keeps the persisted task results behind the run-key cache in the repo (unless set elsewhere)
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path("runs/prefect-results").resolve()))
    from flows.pipeline import pipeline

    return pipeline(str(params_path), overrides, check)
