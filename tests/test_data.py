"""Tests of components.data on the shared real industrial sets and on small files made in tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components.data import (
    FASHION_MNIST_ROOT,
    DataError,
    ImageDataset,
    Sample,
    build_manifest,
    cutpaste,
    list_categories,
    load_image,
    load_mask,
    manifest_version,
    noise_patch,
    oneclass_samples,
    read_manifest,
    scan_mvtec,
    scan_visa,
    split_validation,
    synthetic_anomalies,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
INDUSTRIAL = next(
    (p for p in (REPO.parent / "shared/data/industrial", REPO / "shared/data/industrial") if p.is_dir()),
    REPO.parent / "shared/data/industrial",
)
needs_real = pytest.mark.skipif(not INDUSTRIAL.is_dir(), reason=f"{INDUSTRIAL} is absent")

# (train/good, test/good, test anomalous) from the data set README.
REAL_COUNTS = {"magnetic_tile": (762, 190, 392), "kolektorsdd": (278, 70, 52), "deeppcb": (1000, 500, 500)}


def _raises(match_name: str | Path, *words: str) -> pytest.RaisesExc:
    """Context expecting a one-line DataError that names ``match_name``."""
    return pytest.raises(DataError, match=".*".join([Path(match_name).name.replace(".", r"\."), *words]))


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    """A tiny MVTec-layout copy of kolektorsdd: 3 train, 2 test/good, 2 defect images with masks."""
    src, dst = INDUSTRIAL / "kolektorsdd", tmp_path / "mini"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    files = [f"train/good/{i:03d}.jpg" for i in range(3)] + [f"test/good/{i:03d}.jpg" for i in range(2)]
    files += [f"test/defect/{i:03d}.jpg" for i in range(2)]
    files += [f"ground_truth/defect/{i:03d}_mask.png" for i in range(2)]
    for name in files:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, dst / name)
    return tmp_path


# --- real data sets -------------------------------------------------------------------------------------


@needs_real
@pytest.mark.parametrize("category", sorted(REAL_COUNTS))
def test_scan_real_sets(category: str) -> None:
    samples = scan_mvtec(INDUSTRIAL, category)
    train, test_good, anomalous = REAL_COUNTS[category]
    assert sum(s.split == "train" for s in samples) == train
    assert sum(s.split == "test" and s.label == 0 for s in samples) == test_good
    assert sum(s.label for s in samples) == anomalous
    for s in samples:
        assert (s.mask_path is not None) == (s.label == 1)
        assert s.defect == "good" if s.label == 0 else s.defect != "good"
    assert all(Path(s.mask_path).is_file() for s in samples if s.mask_path)
    assert samples == scan_mvtec(INDUSTRIAL, category)  # deterministic
    assert all(s.mask_path is None for s in scan_mvtec(INDUSTRIAL, category, masks=False))


@needs_real
def test_list_categories_real() -> None:
    assert list_categories(INDUSTRIAL) == ["deeppcb", "kolektorsdd", "magnetic_tile"]


@needs_real
def test_manifest_real_subset(tmp_path: Path) -> None:
    samples = scan_mvtec(INDUSTRIAL, "kolektorsdd")
    subset = samples[:12] + [s for s in samples if s.label == 1][:8]
    table = build_manifest(subset, workers=2)
    assert table.column_names[:9] == [
        "path", "category", "split", "label", "defect", "mask_path", "sha256", "width", "height",
    ]  # fmt: skip
    types = dict(zip(table.column_names, table.schema.types, strict=True))
    assert types["label"] == pa.int8() and types["width"] == pa.int32() and types["height"] == pa.int32()
    assert types["path"] == types["mask_path"] == types["sha256"] == pa.string()
    assert table.num_rows == 20 and table.column("mask_path").null_count == 12
    for row in table.to_pylist()[::5]:
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        assert Image.open(row["path"]).size == (row["width"], row["height"])
        if row["mask_path"]:
            assert row["mask_sha256"] == hashlib.sha256(Path(row["mask_path"]).read_bytes()).hexdigest()

    target = tmp_path / "out" / "manifest.parquet"
    write_manifest(table, target)
    assert read_manifest(target) == subset
    assert [p.name for p in target.parent.iterdir()] == ["manifest.parquet"]

    version = manifest_version(table)
    assert version == manifest_version(pq.read_table(target))
    assert version == manifest_version(table.take(list(range(19, -1, -1))))
    assert version == manifest_version(build_manifest(list(reversed(subset)), workers=0))
    assert version != manifest_version(table.slice(1))


# --- broken inputs --------------------------------------------------------------------------------------


def test_zero_byte_image(mini: Path) -> None:
    bad = mini / "mini/train/good/zero.png"
    bad.touch()
    samples = scan_mvtec(mini, "mini")
    with _raises(bad, "zero-byte"):
        build_manifest(samples, workers=0)
    with _raises(bad, "zero-byte"):
        load_image(str(bad))


@needs_real
def test_truncated_image(tmp_path: Path) -> None:
    data = (INDUSTRIAL / "deeppcb/train/good/0000.png").read_bytes()
    bad = tmp_path / "half.png"
    bad.write_bytes(data[: len(data) // 2])
    with _raises(bad, "truncated"):
        load_image(str(bad))
    jpg = tmp_path / "half.jpg"
    jpg.write_bytes((INDUSTRIAL / "kolektorsdd/train/good/000.jpg").read_bytes()[:2000])
    with _raises(jpg, "truncated"):
        load_image(str(jpg))


def test_stray_text_file(mini: Path) -> None:
    bad = mini / "mini/test/defect/notes.txt"
    bad.write_text("hello")
    (mini / "mini/train/good/.DS_Store").write_bytes(b"\0")  # hidden files are ignored
    with _raises(bad, "not an image"):
        scan_mvtec(mini, "mini")


def test_garbage_with_image_extension(mini: Path) -> None:
    bad = mini / "mini/train/good/zzz.png"
    bad.write_bytes(b"this is not a png at all")
    samples = scan_mvtec(mini, "mini")
    for workers in (0, 2):
        with _raises(bad, "not an image"):
            build_manifest(samples, workers=workers)


def test_mask_size_mismatch(mini: Path) -> None:
    mask = mini / "mini/ground_truth/defect/001_mask.png"
    Image.new("L", (10, 10), 255).save(mask)
    samples = scan_mvtec(mini, "mini")
    with _raises(mask, "size"):
        build_manifest(samples, workers=0)
    with _raises(mask, "size"):
        ImageDataset(samples, 32)[[s.mask_path for s in samples].index(str(mask))]
    with _raises(mask, "10x10"):
        load_mask(str(mask), (126, 320))


def test_missing_mask(mini: Path) -> None:
    (mini / "mini/ground_truth/defect/001_mask.png").unlink()
    with _raises("001.jpg", "no mask"):
        scan_mvtec(mini, "mini")
    samples = scan_mvtec(mini, "mini", masks=False)
    assert sum(s.label for s in samples) == 2 and all(s.mask_path is None for s in samples)


def test_btad_mask_names(mini: Path) -> None:
    gt = mini / "mini/ground_truth/defect"
    for mask in gt.iterdir():
        mask.rename(gt / mask.name.replace("_mask", ""))
    masks = [s.mask_path for s in scan_mvtec(mini, "mini") if s.label]
    assert [Path(m).name for m in masks] == ["000.png", "001.png"]


def test_train_good_missing_or_empty(mini: Path) -> None:
    good = mini / "mini/train/good"
    for f in good.iterdir():
        f.unlink()
    (good / ".hidden").touch()
    with _raises("good", "empty"):
        scan_mvtec(mini, "mini")
    shutil.rmtree(mini / "mini/train")
    with _raises("mini", "train/good is missing"):
        scan_mvtec(mini, "mini")


def test_unknown_category(mini: Path) -> None:
    with pytest.raises(DataError, match=r"nope.*available: mini"):
        scan_mvtec(mini, "nope")


def test_write_manifest_failure_leaves_nothing(mini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = build_manifest(scan_mvtec(mini, "mini"), workers=0)
    target = mini / "manifest.parquet"
    with _raises(target, "lacks column"):
        write_manifest(table.drop_columns(["sha256"]), target)
    wrong = table.set_column(3, "label", pa.array(["x"] * table.num_rows))
    with _raises(target, "types"):
        write_manifest(wrong, target)

    def broken(table: pa.Table, where: object, **kwargs: object) -> None:
        where.write(b"PAR1 partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(table, target)
    assert sorted(p.name for p in mini.iterdir()) == ["mini"]


def test_read_manifest_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.parquet"
    bad.write_text("nope")
    with _raises(bad, "cannot read manifest"):
        read_manifest(bad)


# --- image modes and formats ----------------------------------------------------------------------------

MODES = [
    ("1", ".png"), ("L", ".jpg"), ("L", ".TIFF"), ("LA", ".png"), ("P", ".png"), ("P", ".bmp"),
    ("PA", ".tif"), ("RGB", ".bmp"), ("RGB", ".JPEG"), ("RGBA", ".png"), ("I;16", ".png"), ("I;16", ".tif"),
    ("I;16B", ".tif"), ("I", ".tif"), ("F", ".tif"), ("CMYK", ".jpg"), ("CMYK", ".tif"), ("YCbCr", ".tif"),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "ext"), MODES)
def test_image_modes(tmp_path: Path, mode: str, ext: str) -> None:
    path = tmp_path / f"img{ext}"
    Image.new(mode, (7, 5)).save(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.asarray(image).dtype == np.uint8 and np.asarray(image).shape == (5, 7, 3)


def test_bit_depth_scaling(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    for ext in (".png", ".tif"):
        Image.fromarray(values).save(tmp_path / f"a{ext}")
        assert np.asarray(load_image(str(tmp_path / f"a{ext}")))[0, :, 0].tolist() == [0, 100, 255]
    Image.fromarray(np.array([[0, 2**31 - 1]], np.int32)).save(tmp_path / "i.tif")
    assert np.asarray(load_image(str(tmp_path / "i.tif")))[0, :, 1].tolist() == [0, 255]
    Image.fromarray(np.array([[-3.0, 100.4, 300.0]], np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(str(tmp_path / "f.tif")))[0, :, 2].tolist() == [0, 100, 255]


def test_palette_and_alpha(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert np.asarray(load_image(str(tmp_path / "p.png")))[0].tolist() == [[0, 0, 0], [255, 0, 0]]
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "a.png")
    assert np.asarray(load_image(str(tmp_path / "a.png")))[0, 0].tolist() == [10, 20, 30]


# --- torch dataset and synthetic anomalies --------------------------------------------------------------


def test_image_dataset(mini: Path) -> None:
    samples = scan_mvtec(mini, "mini")
    ds = ImageDataset(samples, 64)
    assert len(ds) == len(samples) == 7
    for i, sample in enumerate(samples):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.bool
        assert item["label"] == sample.label and item["index"] == i
        assert bool(item["mask"].any()) == (sample.label == 1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2)))
    assert batch["image"].shape == (7, 3, 64, 64) and batch["label"].tolist() == [s.label for s in samples]
    with pytest.raises(DataError, match="image_size"):
        ImageDataset(samples, 0)
    with pytest.raises(DataError, match="synthetic"):
        ImageDataset(samples, 32, synthetic="blur")


@pytest.mark.parametrize("kind", ["cutpaste", "noise"])
def test_synthetic_dataset(mini: Path, kind: str) -> None:
    normal = [s for s in scan_mvtec(mini, "mini") if s.label == 0]
    a, b = ImageDataset(normal, 64, synthetic=kind, seed=3), ImageDataset(normal, 64, synthetic=kind, seed=3)
    plain = ImageDataset(normal, 64)
    for i in range(len(normal)):
        x, y, p = a[i], b[i], plain[i]
        assert x["label"] == 1 and x["mask"].any()
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["image"][:, ~x["mask"]], p["image"][:, ~x["mask"]])
    assert not torch.equal(ImageDataset(normal, 64, synthetic=kind, seed=4)[0]["mask"], a[0]["mask"])

    extra = synthetic_anomalies(normal, kinds=(kind,))
    assert [s.defect for s in extra] == [f"synthetic_{kind}"] * len(normal)
    mixed = ImageDataset(normal + extra, 64, seed=3)
    assert mixed[0]["label"] == 0 and not mixed[0]["mask"].any()
    assert torch.equal(mixed[len(normal)]["image"], a[0]["image"])


@pytest.mark.parametrize("fn", [cutpaste, noise_patch])
def test_synthetic_transforms(fn: object) -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    for seed in range(20):
        out, mask = fn(image, np.random.default_rng(seed))  # type: ignore[operator]
        again, mask2 = fn(image, np.random.default_rng(seed))  # type: ignore[operator]
        assert out.dtype == np.uint8 and out.shape == image.shape and mask.shape == (48, 40)
        assert np.array_equal(out, again) and np.array_equal(mask, mask2)
        assert 0.01 <= mask.mean() <= 0.2
        assert np.array_equal(out[~mask], image[~mask])
    gray = np.repeat(image[..., :1], 3, axis=2)
    out, _ = noise_patch(gray, np.random.default_rng(1))
    assert (out == out[..., :1]).all()


def test_split_validation() -> None:
    samples = [Sample(f"/d/{i}.png", "c", "train", 0, "good") for i in range(50)]
    train, val = split_validation(samples, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40 and set(train).isdisjoint(val)
    assert train == [s for s in samples if s in train] and val == [s for s in samples if s in val]
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_validation(shuffled, 0.2, seed=1)[1]) == set(val)
    assert set(split_validation(samples, 0.2, seed=2)[1]) != set(val)
    assert split_validation(samples, 0.0) == (samples, [])
    assert len(split_validation(samples[:2], 0.01)[1]) == 1
    assert len(split_validation(samples[:2], 0.9)[0]) == 1
    for bad in (1.0, -0.1):
        with pytest.raises(DataError, match="fraction"):
            split_validation(samples, bad)


def test_per_sample_choices_do_not_depend_on_where_the_data_lives(tmp_path: Path) -> None:
    """The same images in two folders: the same validation slice and the same synthetic anomalies (the
    choices are seeded by ``Sample.key``, not by the absolute path)."""
    copies = [tmp_path / where / "train" / "good" for where in ("a/deep/folder", "b")]
    pixels = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(12)]
    sets = []
    for folder in copies:
        folder.mkdir(parents=True)
        for i, image in enumerate(pixels):
            Image.fromarray(image).save(folder / f"{i:03d}.png")
        sets.append([Sample(str(folder / f"{i:03d}.png"), "c", "train", 0, "good") for i in range(12)])
    val_a, val_b = (split_validation(s, 0.25, seed=3)[1] for s in sets)
    assert [s.key for s in val_a] == [s.key for s in val_b] and len(val_a) == 3
    assert {s.path for s in val_a}.isdisjoint(s.path for s in val_b)
    anomalies = [ImageDataset(synthetic_anomalies(v, ["cutpaste"]), 32) for v in (val_a, val_b)]
    for x, y in zip(anomalies[0], anomalies[1], strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


# --- VisA and one-class sets ----------------------------------------------------------------------------


def test_scan_visa(tmp_path: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i, (split, label) in enumerate([("train", "normal"), ("test", "normal"), ("test", "anomaly")]):
            image = f"{obj}/Data/Images/{'Anomaly' if label == 'anomaly' else 'Normal'}/{i:03d}.JPG"
            mask = f"{obj}/Data/Masks/Anomaly/{i:03d}.png" if label == "anomaly" else ""
            for rel in filter(None, (image, mask)):
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (8, 6)).save(tmp_path / rel, format="PNG" if rel == mask else "JPEG")
            rows.append(f"{obj},{split},{label},{image},{mask}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")

    samples = scan_visa(tmp_path, "pcb1", "split_csv/1cls.csv")
    assert [(s.split, s.label, s.defect) for s in samples] == [
        ("train", 0, "good"), ("test", 1, "anomaly"), ("test", 0, "good"),
    ]  # fmt: skip
    assert samples[1].mask_path and Path(samples[1].mask_path).is_file() and samples[2].mask_path is None
    assert build_manifest(samples, workers=0).num_rows == 3
    with pytest.raises(DataError, match="available: candle, pcb1"):
        scan_visa(tmp_path, "cashew", tmp_path / "split_csv/1cls.csv")
    (tmp_path / "pcb1/Data/Masks/Anomaly/002.png").unlink()
    with _raises("002.JPG", "mask"):
        scan_visa(tmp_path, "pcb1")
    assert scan_visa(tmp_path, "pcb1", masks=False)[1].mask_path is None


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_images(labels: list[int]) -> np.ndarray:
    """N x 3072 uint8 rows (R plane, G plane, B plane); pixel (0, 0) is (label, 100, 200)."""
    data = np.zeros((len(labels), 3, 32, 32), np.uint8)
    data[:, 0, 0, 0], data[:, 1, 0, 0], data[:, 2, 0, 0] = labels, 100, 200
    return data.reshape(len(labels), 3072)


def test_cifar10_oneclass(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
    meta = {b"num_cases_per_batch": 4, b"label_names": names, b"num_vis": 3072}
    _write_pickle(folder / "batches.meta", meta)
    for i, labels in enumerate([[0, 1, 2, 3], [3, 3, 4, 5], [6, 7, 8, 9], [9, 3, 0, 0], [1, 1, 1, 3]], 1):
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels}
        batch |= {b"data": _cifar_images(labels), b"filenames": [b"x.png"] * 4}
        _write_pickle(folder / f"data_batch_{i}", batch)
    test_labels = [3, 5, 3, 0, 9, 1]
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels}
    batch |= {b"data": _cifar_images(test_labels), b"filenames": [b"x.png"] * 6}
    _write_pickle(folder / "test_batch", batch)

    samples = oneclass_samples("cifar10", tmp_path, 3)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 5 and all(s.label == 0 and s.category == "cat" for s in train)
    assert [s.label for s in test] == [0, 1, 0, 1, 1, 1]
    assert [s.defect for s in test] == ["good", "dog", "good", "airplane", "truck", "automobile"]
    assert train[0].path == f"{folder / 'data_batch_1'}#3"
    assert np.asarray(load_image(test[3].path))[0, 0].tolist() == [0, 100, 200]
    assert ImageDataset(test, 16)[0]["image"].shape == (3, 16, 16)
    table = build_manifest(samples, workers=0)
    assert table.column("width").to_pylist() == [32] * len(samples)
    pixels = np.asarray(load_image(test[0].path))
    assert table.column("sha256")[len(train)].as_py() == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert oneclass_samples("cifar10", folder, 3) == samples  # the batch folder itself works too
    with pytest.raises(DataError, match="normal_class"):
        oneclass_samples("cifar10", tmp_path, 10)
    with pytest.raises(DataError, match="dataset"):
        oneclass_samples("mnist", tmp_path, 0)


def test_cifar100_oneclass(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine_names = [f"class_{i}".encode() for i in range(100)]
    coarse_names = [f"super_{i}".encode() for i in range(20)]
    _write_pickle(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    for name, fine in (("train", [4, 30, 4, 55]), ("test", [4, 72, 55])):
        coarse = [f // 5 for f in fine]
        part = {b"filenames": [b"x.png"] * len(fine), b"batch_label": name.encode(), b"fine_labels": fine}
        _write_pickle(folder / name, part | {b"coarse_labels": coarse, b"data": _cifar_images(fine)})
    samples = oneclass_samples("cifar100", tmp_path, 4)
    assert [s.split for s in samples] == ["train", "train", "test", "test", "test"]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1]
    assert samples[0].category == "class_4" and samples[3].defect == "class_72"
    coarse = oneclass_samples("cifar100", tmp_path, 11, coarse=True)  # 55 // 5 == 11
    assert [s.path.rsplit("/", 1)[1] for s in coarse] == ["train#3", "test#0", "test#1", "test#2"]
    assert [s.label for s in coarse] == [0, 1, 1, 0] and coarse[0].category == "super_11"


def test_fashion_mnist_plain_idx(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    for prefix, labels in (("train", [0, 1, 0]), ("t10k", [2, 0, 1])):
        header = np.array([0x803, 3, 28, 28], ">u4").tobytes()
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([0x801, 3], ">u4").tobytes()
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(header + bytes(labels))
    samples = oneclass_samples("fashion_mnist", tmp_path, 0)
    assert [(s.split, s.label, s.defect) for s in samples] == [
        ("train", 0, "good"), ("train", 0, "good"), ("test", 1, "pullover"), ("test", 0, "good"),
        ("test", 1, "trouser"),
    ]  # fmt: skip
    assert np.array_equal(np.asarray(load_image(samples[1].path))[..., 0], images[2])


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian() -> None:
    samples = oneclass_samples("fashion_mnist", None, 0)
    assert sum(s.split == "train" for s in samples) == 6000
    test = [s for s in samples if s.split == "test"]
    assert len(test) == 10000 and sum(s.label == 0 for s in test) == 1000
    assert samples[0].category == "t_shirt_top" and {s.defect for s in test} >= {"good", "ankle_boot"}
    assert load_image(test[0].path).size == (28, 28)
    item = ImageDataset(test[:2], 32)[1]
    assert item["image"].shape == (3, 32, 32) and item["image"].float().std() > 0


def test_sample_validation() -> None:
    with pytest.raises(DataError, match="split"):
        Sample("a.png", "c", "val", 0, "good")
    with pytest.raises(DataError, match="label"):
        Sample("a.png", "c", "test", 2, "good")
    assert issubclass(DataError, ValueError) and str(DataError("a\nb")) == "a b"
    assert dataclasses.replace(Sample("a.png", "c", "test", 0, "good"), label=1).label == 1
