"""Image AUROC / pixel AUROC / AUPRO and times of frozen-feature methods on the shared industrial sets.

    .venv/bin/python benchmarks/bench_methods.py --methods patchcore padim --out outputs/bench
Runs ``adaptad run`` for every (category, method) and prints one table (figures for the issue notes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli import main as adaptad

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "industrial"
KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pixel_f1_max",
    "fit_seconds",
    "predict_seconds",
    "metrics_seconds",
    "fit_images_per_second",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-root", type=Path, default=ROOT)
    p.add_argument("--categories", nargs="+", default=["magnetic_tile", "kolektorsdd", "deeppcb"])
    p.add_argument("--methods", nargs="+", default=["patchcore", "padim"])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = p.parse_args()
    rows = []
    for category in args.categories:
        for method in args.methods:
            out = args.out / f"{category}-{method}"
            extra = ["--param", f"coreset_ratio={args.coreset_ratio}"] if method == "patchcore" else []
            code = adaptad(
                [
                    "run",
                    "--data-root",
                    str(args.data_root),
                    "--category",
                    category,
                    "--method",
                    method,
                    "--backbone",
                    args.backbone,
                    "--image-size",
                    str(args.image_size),
                    "--output",
                    str(out),
                    "--force",
                    "--quiet",
                    "--workers",
                    "1",
                    *extra,
                ]
            )
            if code == 0:
                m = json.loads((out / "metrics.json").read_text())
                rows.append((category, method, *(m[k] for k in KEYS)))
                print(category, method, {k: round(m[k], 3) for k in KEYS}, flush=True)
    print(f"\n{args.backbone} @ {args.image_size}px, patchcore coreset {args.coreset_ratio:.0%}")
    print(
        "| category | method | image AUROC | pixel AUROC | AUPRO | pixel F1 "
        "| fit s | predict s | metrics s | fit img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            "| "
            + " | ".join([r[0], r[1], *(f"{v:.3f}" if i < 4 else f"{v:.1f}" for i, v in enumerate(r[2:]))])
            + " |"
        )


if __name__ == "__main__":
    main()
