"""Which outliers make PANDA-OE's head a detector? Its linear-probe start, per outlier source (issue 20).

PANDA-OE (``head_init: probe``) starts from a logistic regression of the frozen pooled last stage:
normal train images (0) vs outliers (1), standardised, classes weighted equally — the head that its
clipped fine-tuning then barely moves (RESULTS.md: kolektorsdd 0.683 → 0.685 over three epochs). So the
probe's test image AUROC says what an outlier source can give. Sources compared, with no test label used
to build any of them:

  other     ``--outliers``, a folder of another domain's images (the evidence grid's PANDA-OE folders:
            Fashion-MNIST images for the industrial sets, the industrial sets' normal images for
            Fashion-MNIST; benchmarks/grid_evidence.py makes them)
  cutpaste  the normal train images with a CutPaste patch (components.data.synthetic, in-domain)
  noise     the normal train images with a noise blob
  both      cutpaste + noise

DN2 (k = 2 on the same features, exact) is printed beside as the reference PANDA starts from. Test labels
are read only to print the table. Up to ``--max-train`` train and ``--max-test`` test images (seeded).

    .venv/bin/python benchmarks/bench_oe_outliers.py --outliers $EVIDENCE_OUT/oe_fashion_mnist \
        --data industrial:deeppcb industrial:kolektorsdd industrial:magnetic_tile
    .venv/bin/python benchmarks/bench_oe_outliers.py --outliers $EVIDENCE_OUT/oe_industrial \
        --data fashion_mnist:shirt fashion_mnist:t_shirt_top fashion_mnist:pullover
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_forgetting import samples_of  # noqa: E402
from benchmarks.panda_ablation import knn_auroc  # noqa: E402
from components.backbones import FeatureExtractor  # noqa: E402
from components.data import FASHION_MNIST_ROOT, ImageDataset, scan_image_folder  # noqa: E402
from components.methods.base import pooled  # noqa: E402

#: the evidence grid's image size per group
SIZES = {"industrial": 192, "fashion_mnist": 64}


def subset(items: list, n: int, seed: int = 0) -> list:
    """At most ``n`` of ``items``, a seeded sample in the original order."""
    if len(items) <= n:
        return items
    keep = np.random.default_rng(seed).choice(len(items), n, replace=False)
    return [items[i] for i in sorted(keep)]


@torch.no_grad()
def features(
    extractor: FeatureExtractor, samples: list, size: int, synthetic: str | None = None
) -> np.ndarray:
    """Pooled last-stage features (the head's input) of ``samples``, optionally with a synthetic anomaly."""
    data = ImageDataset(samples, size, synthetic=synthetic, seed=1)
    out = [
        pooled(extractor(b["image"])[-1]).float() for b in torch.utils.data.DataLoader(data, batch_size=32)
    ]
    return torch.cat(out).double().numpy()


def probe_scores(normal: np.ndarray, outliers: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The probe head's logits on ``test`` (as PANDAOE._probe_head fits it)."""
    x = np.r_[normal, outliers]
    y = np.r_[np.zeros(len(normal)), np.ones(len(outliers))]
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit((x - mean) / std, y)
    return probe.decision_function((test - mean) / std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--outliers", type=Path, required=True, help="folder of another domain's images")
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--max-test", type=int, default=2000)
    ap.add_argument("--out", type=Path, help="append one JSON line per data set")
    args = ap.parse_args()
    torch.manual_seed(0)
    extractor = FeatureExtractor("tf_efficientnet_lite0", "pypi", levels=(1, 2, 3, 4)).eval()
    other = scan_image_folder(args.outliers, "--outliers")
    for spec in args.data:
        start = time.perf_counter()
        train, test, _ = samples_of(spec, FASHION_MNIST_ROOT, args.root / "industrial")
        size = SIZES[spec.partition(":")[0]]
        train, test = subset(train, args.max_train), subset(test, args.max_test)
        labels = np.array([s.label for s in test])
        normal, scored = features(extractor, train, size), features(extractor, test, size)
        cut = features(extractor, train, size, "cutpaste")
        noise = features(extractor, train, size, "noise")
        sources = {
            "other": features(extractor, subset(other, len(train)), size),
            "cutpaste": cut,
            "noise": noise,
            "both": np.r_[cut, noise],
        }
        row = {"data": spec, "train": len(train), "test": len(test)}
        row["dn2"] = knn_auroc(torch.from_numpy(normal), torch.from_numpy(scored), labels)
        for name, outliers in sources.items():
            row[f"probe_{name}"] = roc_auc_score(labels, probe_scores(normal, outliers, scored))
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
