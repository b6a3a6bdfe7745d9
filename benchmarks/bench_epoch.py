"""Seconds per training epoch of a fine-tuned method, with and without the exact speed-ups (issue 19).

One process, one thread — what one of the two DDP ranks of the grid does in an epoch: its half of the
fit split (training steps), then the end-of-epoch validation on the whole validation slice and the
collapse monitor on the same slice. "before": every step and pass runs the whole backbone
(``cache_frozen=False``) and validation and monitor each compute the slice's features; "after": the
frozen stages run once per image (components/prefix.py) and validation and monitor share one forward
(``AnomalyMethod.sharing_monitor_features``). Both run the same seeded steps; the script prints the
largest weight difference after the timed epochs, which the equivalence test bounds
(tests/test_prefix_cache.py).

    .venv/bin/python benchmarks/bench_epoch.py --data fashion_mnist:shirt --size 64
    .venv/bin/python benchmarks/bench_epoch.py --data industrial:magnetic_tile --size 192
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from components.data import oneclass_category, scan_mvtec, split_validation, synthetic_anomalies
from components.evaluation import loader
from components.methods import MethodSpec, build_method
from components.monitor import CollapseMonitor, CollapseThresholds


def samples_of(data: str, fashion_root: str, industrial_root: str):
    kind, _, category = data.partition(":")
    if kind == "fashion_mnist":
        samples = oneclass_category("fashion_mnist", fashion_root, category)
    else:
        samples = scan_mvtec(industrial_root, category)
    return [s for s in samples if s.split == "train"]


def run(method: str, fast: bool, args) -> dict:
    torch.manual_seed(0)
    train = samples_of(args.data, args.fashion_root, args.industrial_root)
    fit, held = split_validation(train, 0.2, seed=0)
    validation = held + synthetic_anomalies(held, ("cutpaste", "noise"))
    shard = fit[::2]  # rank 0 of 2
    params = {"cache_frozen": fast, "ewc": True, "fisher_images": 8} if method == "panda" else {}
    m = build_method(
        MethodSpec(method, "tf_efficientnet_lite0", "pypi", None, args.size, params), "cpu", progress=False
    )
    monitor = CollapseMonitor(CollapseThresholds())
    val = loader(validation, args.size, 16, 0)

    def sharing():
        return m.sharing_monitor_features() if fast else _Null()

    t0 = time.perf_counter()
    with sharing():
        m.begin_training(loader(fit, args.size, 16, 0), val)
        monitor.begin(m.monitor_features, loader(fit, args.size, 16, 0), val)
    begin = time.perf_counter() - t0
    opt = m.make_optimizer()
    params_ = [p for g in opt.param_groups for p in g["params"]]
    rows = []
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        m.begin_epoch(epoch, len(shard) // 16)
        m.train_mode()
        train_loader = torch.utils.data.DataLoader(
            loader(shard, args.size, 16, 0).dataset, batch_size=16, shuffle=True, generator=generator
        )
        for batch in train_loader:
            loss = m.training_loss(batch, m.trainable())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if m.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params_, m.max_grad_norm)
            opt.step()
        steps = time.perf_counter() - t
        with sharing():
            m.end_epoch(epoch, val)
            monitor.measure(m.monitor_features, val)
        rows.append({"steps_s": steps, "epoch_s": time.perf_counter() - t})
    weights = {n: p.detach().clone() for n, p in m.extractor.model.named_parameters()}
    return {"begin_s": begin, "epochs": rows, "weights": weights}


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion_mnist:shirt", help="fashion_mnist:<class> | industrial:<set>")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["panda"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fashion-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--industrial-root", default="../shared/data/industrial")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for method in args.methods:
        before, after = run(method, False, args), run(method, True, args)
        diff = max(float((before["weights"][n] - w).abs().max()) for n, w in after["weights"].items())

        def mean(r, key):
            return sum(e[key] for e in r["epochs"]) / len(r["epochs"])

        out = {
            "method": method,
            "data": args.data,
            "size": args.size,
            "begin_s": [round(before["begin_s"], 1), round(after["begin_s"], 1)],
            "steps_s_per_epoch": [round(mean(before, "steps_s"), 1), round(mean(after, "steps_s"), 1)],
            "epoch_s": [round(mean(before, "epoch_s"), 1), round(mean(after, "epoch_s"), 1)],
            "speedup_epoch": round(mean(before, "epoch_s") / mean(after, "epoch_s"), 2),
            "max_weight_diff": diff,
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
