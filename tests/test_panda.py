"""PANDA on real images and real ImageNet weights: frozen stages, fixed centre, EWC, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from components.data import scan_mvtec, split_validation, synthetic_anomalies
from components.evaluation import loader
from components.methods import MethodSpec, build_method, load_method
from components.methods.panda import stage_boundary

SIZE = 96


@pytest.fixture(scope="module")
def kolektor(industrial_root):
    samples = scan_mvtec(industrial_root, "kolektorsdd")
    train = [s for s in samples if s.split == "train"][:20]
    fit, held = split_validation(train, 0.3)
    return fit, held + synthetic_anomalies(held)


def panda(**params):
    spec = MethodSpec("panda", "tf_efficientnet_lite0", "pypi", None, SIZE, {"gallery": 2, **params})
    return build_method(spec, "cpu", progress=False)


def test_only_the_last_stages_train_and_batchnorm_stays_in_eval() -> None:
    m = panda(trainable_stages=2)
    trainable = {n for n, p in m.extractor.model.named_parameters() if p.requires_grad}
    assert trainable == set(stage_boundary(m.extractor, 2)) and trainable
    assert all(n.startswith(("blocks.3", "blocks.4", "blocks.5", "blocks.6")) for n in trainable)
    assert not any(n.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2")) for n in trainable)
    m.train_mode()
    norms = [mod for mod in m.extractor.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert norms and not any(mod.training for mod in norms)
    with pytest.raises(ValueError, match="trainable_stages=9"):
        panda(trainable_stages=9)


def _train(m, fit, validation, epochs: int) -> list[float]:
    m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
    opt = m.make_optimizer()
    losses = []
    for epoch in range(1, epochs + 1):
        m.train_mode()
        for batch in loader(fit, SIZE, 7, 0):
            loss = m.training_loss(batch, m.extractor)
            opt.zero_grad()
            loss.backward()
            if m.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in m.param_groups() for p in g["params"]], m.max_grad_norm
                )
            opt.step()
            losses.append(float(loss.detach()))
        report = m.end_epoch(epoch, loader(validation, SIZE, 8, 0))
        assert 0 <= report.metrics["val_auroc"] <= 1
    return losses


def test_compactness_loss_pulls_features_to_the_fixed_centre(kolektor) -> None:
    fit, validation = kolektor
    m = panda(epochs=4, lr=0.01, max_grad_norm=None, early_stopping=False)
    losses = _train(m, fit, validation, 4)
    center = m.center.clone()
    assert losses[-1] < losses[0]  # adaptation really moves the features towards c
    assert torch.equal(center, m.center)  # c is the pretrained mean, fixed


def test_ewc_penalty_is_zero_at_the_pretrained_weights_and_grows_away_from_them(kolektor, tmp_path) -> None:
    fit, validation = kolektor
    m = panda(epochs=1, ewc=True, fisher_images=3)
    tags = m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
    assert tags["panda.fisher"] == "estimated:pretrained-predictive:3-images"
    assert tags["panda.regulariser"] == "ewc+early_stopping"  # both on: the tag names both
    assert set(m.fisher) == set(m.trainable_names)
    assert all((f >= 0).all() for f in m.fisher.values()) and any(f.sum() > 0 for f in m.fisher.values())
    batch = next(iter(loader(fit, SIZE, 4, 0)))
    m.ewc = False
    plain = float(m.training_loss(batch, m.extractor).detach())
    m.ewc = True
    assert float(m.training_loss(batch, m.extractor).detach()) == pytest.approx(plain, rel=1e-6)
    with torch.no_grad():
        for p in m._params.values():
            p.add_(0.01)
    m.ewc = False
    moved = float(m.training_loss(batch, m.extractor).detach())
    m.ewc = True
    assert float(m.training_loss(batch, m.extractor).detach()) > moved
    # a Fisher file in the backbone's parameter names is used as given
    save_file({n: torch.ones_like(f) for n, f in m.fisher.items()}, str(tmp_path / "fisher.safetensors"))
    m2 = panda(epochs=1, ewc=True, fisher=str(tmp_path / "fisher.safetensors"))
    tags = m2.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
    assert tags["panda.fisher"].startswith("file:") and all(torch.all(f == 1) for f in m2.fisher.values())
    with pytest.raises(ValueError, match=r"fisher=.*missing\.safetensors: file not found"):
        panda(epochs=1, ewc=True, fisher=str(tmp_path / "missing.safetensors")).begin_training(
            loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0)
        )


def test_early_stopping_keeps_the_best_epoch_and_restores_it(kolektor) -> None:
    fit, validation = kolektor
    m = panda(epochs=3, lr=0.5, max_grad_norm=None, patience=1)
    assert m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))["panda.regulariser"] == (
        "early_stopping"
    )
    fixed = panda(epochs=3, early_stopping=False).begin_training(
        loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0)
    )
    assert fixed["panda.regulariser"] == "fixed_epochs:3"  # the paper's protocol: neither regulariser
    best0 = m.best["auroc"]
    m.best["auroc"] = 2.0  # no epoch can beat this: the pretrained weights must come back
    opt = m.make_optimizer()
    m.train_mode()
    for batch in loader(fit, SIZE, 7, 0):
        loss = m.training_loss(batch, m.extractor)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = m.end_epoch(1, loader(validation, SIZE, 8, 0))
    assert report.stop and 0 <= best0 <= 1
    m.end_training()
    assert all(torch.equal(p.detach().cpu(), m.theta0[n]) for n, p in m._params.items())


def test_fitted_panda_saves_and_loads_exactly(kolektor, tmp_path) -> None:
    fit, validation = kolektor
    m = panda(epochs=1, lr=0.05, max_grad_norm=None)
    _train(m, fit, validation, 1)
    m.end_training()
    m.fit(loader(fit, SIZE, 8, 0))
    m.save(tmp_path / "panda")
    again = load_method(tmp_path / "panda", "cpu")
    batch = next(iter(loader(validation, SIZE, 6, 0)))["image"]
    a, b = m.predict(batch), again.predict(batch)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def outlier_folder(tmp_path_factory, industrial_root):
    """Outlier exposure set for kolektorsdd: images of the other categories (magnetic_tile, deeppcb)."""
    import shutil

    root = tmp_path_factory.mktemp("outliers")
    for category in ("magnetic_tile", "deeppcb"):
        (root / category).mkdir()
        for image in sorted((industrial_root / category / "train" / "good").iterdir())[:12]:
            shutil.copy(image, root / category / image.name)
    return root


def test_panda_oe_learns_normal_vs_outliers_and_saves_exactly(kolektor, outlier_folder, tmp_path) -> None:
    fit, validation = kolektor
    spec = MethodSpec(
        "panda_oe", "tf_efficientnet_lite0", "pypi", None, SIZE,
        {"outliers": str(outlier_folder), "epochs": 2, "lr": 0.01, "gallery": 2, "early_stopping": False,
         "head_init": "random", "max_grad_norm": None},
    )  # fmt: skip
    m = build_method(spec, "cpu", progress=False)
    assert "head" in m.networks() and m.trains
    tags = m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
    assert tags["panda_oe.outliers"].endswith("(24 images)")
    opt = m.make_optimizer()
    model = m.trainable()
    losses = []
    for epoch in (1, 2):
        m.train_mode()
        for batch in loader(fit, SIZE, 7, 0):
            loss = m.training_loss(batch, model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        m.end_epoch(epoch, loader(validation, SIZE, 8, 0))
    assert losses[-1] < losses[0] * 0.7  # BCE of normal vs outliers really falls
    m.end_training()
    # the head scores outliers above held-out normal images it never trained on
    held_normal = [s for s in validation if s.label == 0]
    normal = m.logits(next(iter(loader(held_normal, SIZE, 16, 0)))["image"])
    outl = m.logits(m._take_outliers(8))
    assert float(outl.mean()) > float(normal.mean())
    m.fit(loader(fit, SIZE, 8, 0))
    m.save(tmp_path / "oe")
    again = load_method(tmp_path / "oe", "cpu")
    images = next(iter(loader(validation, SIZE, 6, 0)))["image"]
    a, b = m.predict(images), again.predict(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-4, atol=1e-5)


def test_panda_oe_probe_head_separates_before_training_and_leaves_the_stream(
    kolektor, outlier_folder
) -> None:
    """head_init=probe: the head starts as a logistic regression of the frozen features (normal vs
    outliers), identical on every rank; the outlier stream the training steps draw from is unchanged."""
    fit, validation = kolektor
    knobs = {"outliers": str(outlier_folder), "epochs": 1, "gallery": 2}

    def started(head_init: str):
        spec = MethodSpec(
            "panda_oe", "tf_efficientnet_lite0", "pypi", None, SIZE, knobs | {"head_init": head_init}
        )
        m = build_method(spec, "cpu", progress=False)
        tags = m.begin_training(loader(fit, SIZE, 7, 0), loader(validation, SIZE, 8, 0))
        return m, tags

    probe, tags = started("probe")
    assert tags["panda_oe.head_init"].startswith("probe (train accuracy")
    assert float(tags["panda_oe.head_init"].split()[-1].rstrip(")")) > 0.9
    held_normal = [s for s in validation if s.label == 0]
    normal = probe.logits(next(iter(loader(held_normal, SIZE, 16, 0)))["image"])
    assert float((normal < 0).float().mean()) > 0.5  # held-out normal images: mostly on the normal side
    again, _ = started("probe")
    assert torch.equal(probe.head.weight, again.head.weight) and torch.equal(probe.head.bias, again.head.bias)
    random_start, _ = started("random")
    assert torch.equal(probe._take_outliers(5), random_start._take_outliers(5))  # same training stream
    assert probe.max_grad_norm == 1e-3 and probe.lr == 1e-2  # the official recipe by default
    with pytest.raises(ValueError, match="panda_oe head_init='zero': must be one of probe, random"):
        build_method(MethodSpec("panda_oe", "tf_efficientnet_lite0", "none", None, 64, {"head_init": "zero"}))


def test_panda_oe_bad_outlier_folder_is_named(kolektor, tmp_path) -> None:
    fit, validation = kolektor
    spec = MethodSpec(
        "panda_oe", "tf_efficientnet_lite0", "none", None, 64, {"outliers": str(tmp_path / "nope")}
    )
    m = build_method(spec, "cpu", progress=False)
    with pytest.raises(ValueError, match=r"panda_oe outliers .*nope: not a folder"):
        m.begin_training(loader(fit, 64, 7, 0), loader(validation, 64, 8, 0))
    with pytest.raises(ValueError, match="ewc=True"):
        build_method(MethodSpec("panda_oe", "tf_efficientnet_lite0", "none", None, 64, {"ewc": True}), "cpu")
