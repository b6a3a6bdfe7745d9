"""Feature banks (faiss exact/HNSW/IVF, save/load, atomic) and the greedy coreset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from components.banks import BankConfig, FeatureBank, gpu_count
from components.coreset import greedy_coreset, random_projection


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)) * 4
    return (centres[rng.integers(0, 64, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_exact_bank_matches_brute_force() -> None:
    x, q = clustered(3000, 32), clustered(500, 32, seed=1)
    bank = FeatureBank.build(x, config=BankConfig(kind="flat", search_batch=128))
    d2, ids = bank.search(q, k=3)
    ref = torch.cdist(torch.from_numpy(q), torch.from_numpy(x)) ** 2
    rd, ri = ref.topk(3, largest=False)
    assert np.array_equal(ids, ri.numpy())
    assert np.allclose(d2, rd.numpy(), rtol=1e-4, atol=1e-3)


def test_auto_picks_hnsw_for_large_banks_with_calibrated_recall_and_exact_distances() -> None:
    data = clustered(21000, 32)
    x, q = data[:20000], data[20000:]  # queries from the bank's own distribution
    rows = pa.table({"image": np.arange(20000) // 100})  # 200 "images": calibration holds out images
    bank = FeatureBank.build(x, rows, BankConfig(exact_max_rows=5000, use_gpu=False))
    assert bank.meta["kind"] == "hnsw" and bank.meta["ef_search"] >= 16
    d2, ids = bank.search(q, 3)
    t2, truth = FeatureBank.build(x, config=BankConfig(kind="flat")).search(q, 3)
    assert np.mean(ids[:, 0] == truth[:, 0]) >= 0.99
    hit = ids[:, 0] == truth[:, 0]  # candidates are re-ranked with exact float32 distances
    assert np.allclose(d2[hit, 0], t2[hit, 0], rtol=1e-4, atol=1e-4)
    ivf = FeatureBank.build(x, rows, BankConfig(kind="ivf"))  # on request, calibrated the same way
    assert ivf.meta["kind"] == "ivf" and np.mean(ivf.search(q, 1)[1][:, 0] == truth[:, 0]) >= 0.97


def test_calibration_holds_out_whole_images() -> None:
    from components.banks import _held_out

    groups = np.repeat(np.arange(50), 40)  # 50 images x 40 rows
    held = _held_out(len(groups), groups, np.random.default_rng(0))
    assert 0 < len(held) <= 200 and len(held) % 40 == 0
    assert set(np.unique(groups[held])).isdisjoint(np.delete(groups, held))  # every held image whole
    assert len(_held_out(2000, None, np.random.default_rng(0))) == 200  # no images: single rows


def test_save_load_roundtrip_and_atomic_replace(tmp_path) -> None:
    x = clustered(2000, 16)
    rows = pa.table({"image": np.arange(2000) // 10})
    bank = FeatureBank.build(x, rows, BankConfig(kind="ivf", nlist=16, nprobe=4))
    target = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in target.iterdir()) == ["index.faiss", "meta.json", "rows.parquet"]
    loaded = FeatureBank.load(target)
    assert loaded.rows.equals(rows) and loaded.meta == bank.meta and loaded.index.nprobe == 4
    assert np.array_equal(loaded.search(x[:50], 2)[1], bank.search(x[:50], 2)[1])
    hnsw = FeatureBank.build(x, rows, BankConfig(kind="hnsw", ef_search=40))
    again = FeatureBank.load(hnsw.save(tmp_path / "other" / "hnsw"))
    assert again.meta == hnsw.meta and again.meta["ef_search"] == 40
    assert np.array_equal(again.search(x[:50], 2)[1], hnsw.search(x[:50], 2)[1])
    FeatureBank.build(x[:100]).save(target)  # replacing leaves exactly one complete bank, no temp dirs
    assert FeatureBank.load(target).ntotal == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "other"]


def test_bank_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="NaN"):
        FeatureBank.build(np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(ValueError, match="rows"):
        FeatureBank.build(np.zeros((3, 2), np.float32), pa.table({"a": [1]}))
    bank = FeatureBank.build(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        bank.search(np.zeros((1, 5), np.float32))
    with pytest.raises(FileNotFoundError, match="not a feature bank"):
        FeatureBank.load(tmp_path)


def test_greedy_coreset_is_the_greedy_k_center_selection() -> None:
    x = clustered(3000, 200)
    sel = greedy_coreset(x, 300, proj_dim=128, seed=0)
    assert len(set(sel.tolist())) == 300
    z = random_projection(x, 128, 0).astype(np.float64)
    ref, mind = [int(sel[0])], ((z - z[sel[0]]) ** 2).sum(1)
    for _ in range(299):
        j = int(np.argmax(mind))
        ref.append(j)
        mind = np.minimum(mind, ((z - z[j]) ** 2).sum(1))
    # identical up to float32 near-ties; the covering radius is the same
    assert np.mean(sel == np.array(ref)) > 0.95
    radius = lambda s: np.sqrt(np.min(((z[:, None] - z[s][None]) ** 2).sum(-1), 1).max())  # noqa: E731
    assert radius(sel) == pytest.approx(radius(np.array(ref)), rel=1e-4)


def test_lazy_coreset_is_exact_whatever_the_candidate_pool() -> None:
    """Few candidates force a full pass every few points; the chosen sequence must not change."""
    x = clustered(4000, 64)
    wide = greedy_coreset(x, 400, candidates=4096)
    for candidates, block in ((4, 1000), (64, 333)):
        narrow = greedy_coreset(x, 400, candidates=candidates, block=block)
        assert np.mean(narrow == wide) > 0.99  # float32 near-ties may swap a pair


def test_coreset_bounds() -> None:
    x = clustered(100, 8)
    assert np.array_equal(greedy_coreset(x, 100), np.arange(100))
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset(x, 0)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a CUDA device")
def test_gpu_bank_returns_the_cpu_neighbours() -> None:
    x, q = clustered(5000, 64), clustered(500, 64, seed=1)
    cpu = FeatureBank.build(x, config=BankConfig(kind="flat", use_gpu=False)).search(q, 2)
    gpu = FeatureBank.build(x, config=BankConfig(kind="flat", use_gpu=True))
    assert gpu._searcher() is not gpu.index  # really on the device
    assert np.array_equal(gpu.search(q, 2)[1], cpu[1])
