"""The frozen-prefix cache is an exact speed-up: same features, same training, on real images and weights."""

from __future__ import annotations

import torch

from components.backbones import FeatureExtractor, create_model
from components.data import scan_mvtec, split_validation, synthetic_anomalies
from components.evaluation import loader
from components.methods import MethodSpec, build_method
from components.methods.panda import stage_boundary
from components.prefix import PrefixCache, PrefixSplit

SIZE = 96


def _images(industrial_root, n: int = 12) -> torch.Tensor:
    samples = [s for s in scan_mvtec(industrial_root, "magnetic_tile") if s.split == "train"][:n]
    return torch.cat([b["image"] for b in loader(samples, SIZE, 8, 0)])


def test_split_forward_equals_the_model_for_efficientnet_and_resnet(industrial_root) -> None:
    images = _images(industrial_root, 6)
    lite0 = FeatureExtractor("tf_efficientnet_lite0", levels=(1, 2, 3, 4))
    resnet = create_model("resnet18", "none", features_only=True, out_indices=(1, 2, 3))
    for model, boundary in ((lite0.model, "blocks.2"), (resnet, "layer2")):
        x = lite0.normalize(images)
        split = PrefixSplit(model, boundary)
        with torch.no_grad():
            levels, h = split.prefix(x)
            joined, whole = levels + split.suffix(h), model(x)
        assert len(joined) == len(whole)
        for a, b in zip(joined, whole, strict=True):
            assert torch.equal(a, b)


def test_cache_hits_give_the_uncached_features_and_only_while_the_prefix_is_frozen(industrial_root) -> None:
    images = _images(industrial_root)
    extractor = FeatureExtractor("tf_efficientnet_lite0", levels=(1, 2, 3, 4)).eval()
    extractor.requires_grad_(False)
    with torch.no_grad():
        reference = extractor(images)
        assert extractor.cache_prefix("blocks.2") == "on"
        extractor(images[:5])  # fills 5; the next call mixes hits, misses and another batch composition
        cached = extractor(images.flip(0)[:9].flip(0))
        again = extractor(images)
    stats = extractor.prefix_cache.stats()
    assert (stats["hits"], stats["misses"], stats["images"]) == (2 + 12, 5 + 7, 12)
    for level, ref in zip(again, reference, strict=True):
        assert torch.allclose(level, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cached[-1], reference[-1][3:], rtol=1e-5, atol=1e-5)
    # a trainable prefix parameter, or a prefix BatchNorm in training mode, bypasses the cache
    split = extractor.prefix_cache.split
    assert split.deterministic()
    extractor.model.blocks[0][0].bn1.train()
    assert not split.deterministic()
    extractor.eval()
    extractor.model.conv_stem.weight.requires_grad_(True)
    assert not split.deterministic()
    assert extractor.drop_prefix_cache()["images"] == 12 and extractor.prefix_cache is None
    assert "not a block" in FeatureExtractor("tf_efficientnet_lite0").cache_prefix("conv_head")


def test_cache_stops_storing_at_its_memory_limit(industrial_root) -> None:
    images = _images(industrial_root, 4)
    extractor = FeatureExtractor("tf_efficientnet_lite0", levels=(1, 2, 3, 4)).eval().requires_grad_(False)
    extractor.prefix_cache = PrefixCache(PrefixSplit(extractor.model, "blocks.2"), max_mb=0.0)
    with torch.no_grad():
        out = extractor(images)
    assert extractor.prefix_cache.stats()["images"] == 0 and len(out) == 4


def _panda_steps(industrial_root, cache: bool, steps: int = 6) -> tuple[dict, list[float], list[float]]:
    samples = [s for s in scan_mvtec(industrial_root, "kolektorsdd") if s.split == "train"][:24]
    fit, held = split_validation(samples, 0.3)
    validation = held + synthetic_anomalies(held)
    spec = MethodSpec(
        "panda",
        "tf_efficientnet_lite0",
        "pypi",
        None,
        SIZE,
        {"gallery": 2, "cache_frozen": cache, "ewc": True, "fisher_images": 4, "max_grad_norm": None},
    )
    torch.manual_seed(0)
    m = build_method(spec, "cpu", progress=False)
    with m.sharing_monitor_features():
        tags = m.begin_training(loader(fit, SIZE, 8, 0), loader(validation, SIZE, 8, 0))
    assert tags["panda.prefix_cache"] == ("on" if cache else "off: cache_frozen=False")
    opt = m.make_optimizer()
    losses, aurocs = [], []
    generator = torch.Generator().manual_seed(1)
    for epoch in (1, 2):
        m.train_mode()
        train = torch.utils.data.DataLoader(
            loader(fit, SIZE, 8, 0).dataset, batch_size=5, shuffle=True, generator=generator
        )
        for batch in list(train)[: steps // 2]:
            loss = m.training_loss(batch, m.extractor)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        with m.sharing_monitor_features():
            aurocs.append(m.end_epoch(epoch, loader(validation, SIZE, 8, 0)).metrics["val_auroc"])
    weights = {n: p.detach().clone() for n, p in m.extractor.model.named_parameters()}
    m.end_training()
    assert m.extractor.prefix_cache is None
    return weights, losses, aurocs


def test_panda_trains_the_same_weights_with_and_without_the_cache(industrial_root) -> None:
    """lr 1e-2 without clipping so that the steps move the weights measurably (not the 1e-3-clipped crawl)."""
    cached_w, cached_loss, cached_auroc = _panda_steps(industrial_root, cache=True)
    plain_w, plain_loss, plain_auroc = _panda_steps(industrial_root, cache=False)
    assert cached_w.keys() == plain_w.keys()
    pretrained = FeatureExtractor("tf_efficientnet_lite0", levels=(1, 2, 3, 4))
    trained = set(stage_boundary(pretrained, 2))
    for name, p0 in pretrained.model.named_parameters():
        assert torch.allclose(cached_w[name], plain_w[name], rtol=1e-4, atol=1e-6), name
        assert torch.equal(cached_w[name], p0) == (name not in trained), name  # only the last stages moved
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(cached_loss, plain_loss, strict=True))
    assert all(abs(a - b) < 1e-3 for a, b in zip(cached_auroc, plain_auroc, strict=True))


def test_monitor_features_are_shared_only_inside_the_block(industrial_root) -> None:
    images = _images(industrial_root, 4)
    spec = MethodSpec("panda", "tf_efficientnet_lite0", "pypi", None, SIZE, {"gallery": 2})
    m = build_method(spec, "cpu", progress=False)
    with m.sharing_monitor_features():
        first = m.monitor_features(images)
        assert m.monitor_features(images) is first
        assert m.monitor_features(images[:2]) is not first
    assert m.monitor_features(images) is not first
    assert torch.allclose(m.monitor_features(images), first)
