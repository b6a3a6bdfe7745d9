"""Frozen-feature methods on a small real subset: they fit, score, localise, and rank defects higher."""

from __future__ import annotations

import numpy as np
import pytest

from components.backbones import FeatureExtractor
from components.data import scan_mvtec
from components.evaluation import fit_and_evaluate
from components.methods import method_class

SIZE = 128
# Global-kNN image scores (DN2, SPADE, PANDA before training) cannot see magnetic-tile blowholes of
# 0.1 % of the image: only their pixel maps are held to the bar here.
IMAGE_FLOOR = {"dn2": 0.45, "spade": 0.45, "panda": 0.45}
PARAMS = {
    "spade": {"k": 10, "gallery": 3},
    "panda": {"gallery": 3},
    "patchcore": {"coreset_ratio": 0.1},
    "padim": {"d": 50},
}


@pytest.fixture(scope="module")
def magnetic_subset(tmp_path_factory, industrial_root):
    from tests.conftest import copy_subset

    root = tmp_path_factory.mktemp("data")
    copy_subset(industrial_root / "magnetic_tile", root / "magnetic_tile", 40, 10, 4)
    samples = scan_mvtec(root, "magnetic_tile")
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "test"]


# the fine-tuned methods without a training step here; each has its own test module
UNTRAINED = ["dn2", "gaussian", "padim", "panda", "patchcore", "spade"]


@pytest.mark.parametrize("name", UNTRAINED)
def test_method_fits_and_scores_real_defects(name, magnetic_subset) -> None:
    train, test = magnetic_subset
    cls = method_class(name)
    extractor = FeatureExtractor("tf_efficientnet_lite0", "pypi", cls.default_levels)
    method = cls(extractor, SIZE, progress=False, **PARAMS.get(name, {}))
    result = fit_and_evaluate(method, train, test, batch_size=8, workers=0)
    assert result.scores.shape == (len(test),)
    assert result.maps.shape == (len(test), SIZE, SIZE) and np.isfinite(result.maps).all()
    m = result.metrics
    # real ImageNet features localise magnetic-tile defects well above chance even with 40 images
    assert m["image_auroc"] > IMAGE_FLOOR.get(name, 0.6), m
    assert m["pixel_auroc"] > 0.7, m
    assert 0.0 <= m["aupro"] <= 1.0


def test_frozen_methods_have_no_training_step() -> None:
    cls = method_class("padim")
    method = cls(FeatureExtractor("tf_efficientnet_lite0", "none", cls.default_levels), 64, progress=False)
    assert method.param_groups() == [] and not method.trains and method.epochs == 0
    with pytest.raises(NotImplementedError, match="no training step"):
        method.training_loss({}, method.extractor)
    with pytest.raises(NotImplementedError, match="no optimizer"):
        method.make_optimizer()


@pytest.mark.parametrize("name", ["dn2", "spade", "patchcore", "gaussian", "padim"])
def test_fitted_methods_save_and_load_exactly(name, magnetic_subset, tmp_path) -> None:
    from components.evaluation import loader
    from components.methods import MethodSpec, build_method, load_method

    train, test = magnetic_subset
    spec = MethodSpec(name, "tf_efficientnet_lite0", "pypi", None, 64, PARAMS.get(name, {}))
    method = build_method(spec, "cpu", progress=False)
    method.fit(loader(train[:12], 64, 6, 0))
    method.save(tmp_path / name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    again = load_method(tmp_path / name, "cpu")
    images = next(iter(loader(test, 64, 5, 0)))["image"]
    a, b = method.predict(images), again.predict(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-4, atol=1e-5)


def test_unknown_method_and_bad_params() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        method_class("panda9000")
    cls = method_class("patchcore")
    fx = FeatureExtractor("tf_efficientnet_lite0", "none", cls.default_levels)
    with pytest.raises(ValueError, match="coreset_ratio"):
        cls(fx, 64, coreset_ratio=0)
