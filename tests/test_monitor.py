"""The collapse monitor's signals on constructed features with known answers, and its verdict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.monitor import (
    CollapseMonitor,
    CollapseThresholds,
    effective_rank,
    knn_overlap,
    knn_separation,
    knn_sets,
)


def test_effective_rank_counts_the_directions_the_features_use() -> None:
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(400, 16, generator=g, dtype=torch.float64)
    assert effective_rank(iso) == pytest.approx(16, rel=0.1)  # isotropic: all 16 directions
    line = torch.randn(400, 1, generator=g, dtype=torch.float64) * torch.ones(1, 16)
    assert effective_rank(line) == pytest.approx(1, abs=1e-6)  # collapsed onto one line
    assert effective_rank(torch.ones(10, 4)) == 1.0  # all rows equal
    assert effective_rank(iso * 1e-3) == pytest.approx(effective_rank(iso))  # scale does not matter


def test_knn_overlap_is_one_for_the_same_geometry_and_drops_when_scrambled() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g)
    assert knn_overlap(x, x, 5) == 1.0
    assert knn_overlap(3 * x + 1, x, 5) == 1.0  # similarity transforms keep the graph
    scrambled = x[torch.randperm(60, generator=g)]
    assert knn_overlap(scrambled, x, 5) < 0.3  # ~ k / n by chance


def test_knn_sets_in_row_chunks_are_the_exact_neighbours_of_the_whole_matrix() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(103, 12, generator=g)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    whole = d.topk(5, largest=False).indices
    for chunk in (1, 7, 50, 103, 4096):  # chunks that do / do not divide n, one larger than n
        assert torch.equal(knn_sets(x, 5, chunk=chunk), whole)
    assert knn_sets(x[:3], 5).shape == (3, 2)  # k capped at n - 1


def test_knn_separation_is_the_auroc_of_distances_to_the_reference() -> None:
    ref = torch.zeros(4, 2)
    feats = torch.tensor([[0.0, 0.1], [0.1, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert knn_separation(feats, np.array([0, 0, 1, 1]), ref) == 1.0
    assert knn_separation(feats, np.array([1, 1, 0, 0]), ref) == 0.0
    assert np.isnan(knn_separation(feats, np.zeros(4, int), ref))


def test_knn_separation_scores_each_row_against_its_own_group() -> None:
    """A dataset-wide model: two categories far apart; each image must be compared with its own one's."""
    ref = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
    ref_groups = ["a", "a", "b", "b"]
    feats = torch.tensor([[0.0, 0.1], [10.0, 0.1], [0.0, 2.0], [10.0, 2.0]])  # normal a, normal b, anomalies
    labels = np.array([0, 0, 1, 1])
    assert knn_separation(feats, labels, ref, 2, ["a", "b", "a", "b"], ref_groups) == 1.0
    # a group with a single reference: k shrinks to it instead of reaching into the other group
    assert knn_separation(feats, labels, ref[1:], 2, ["a", "b", "a", "b"], ref_groups[1:]) == 1.0


def _batches(x: torch.Tensor, labels: np.ndarray, size: int = 16):
    return [{"image": x[i : i + size], "label": labels[i : i + size]} for i in range(0, len(x), size)]


def test_the_monitor_passes_an_intact_space_and_flags_a_collapsed_one() -> None:
    """Features of a 'model' we control: identity (healthy), then everything squashed onto a line."""
    g = torch.Generator().manual_seed(2)
    normal = torch.randn(40, 12, generator=g)
    anomalous = torch.randn(20, 12, generator=g) * 3 + 4
    val = torch.cat([normal, anomalous])
    labels = np.array([0] * 40 + [1] * 20)
    train = [{"image": torch.randn(16, 12, generator=g)} for _ in range(3)]
    monitor = CollapseMonitor(CollapseThresholds(reference_images=32))
    healthy = monitor.begin(lambda x: x, train, _batches(val, labels))
    assert not healthy.collapsed and healthy.metrics["rank_ratio"] == pytest.approx(1.0)
    assert healthy.metrics["knn_overlap"] == 1.0 and healthy.metrics["drift"] == 0.0
    assert healthy.metrics["separation"] > 0.95

    direction = torch.randn(12, generator=g)
    squash = lambda x: (x @ direction)[:, None] * direction[None] * 1e-3  # noqa: E731
    report = monitor.measure(squash, _batches(val, labels))
    assert report.collapsed
    assert report.reason.startswith("rank_ratio") and report.metrics["knn_overlap"] < 0.5
    assert report.metrics["effective_rank"] < 1.5 and report.metrics["drift"] > 0.9
    diverged = monitor.measure(lambda x: x * float("nan"), _batches(val, labels))
    assert diverged.collapsed and "non-finite" in diverged.reason

    # state round trip (checkpoints): a restored monitor measures the same
    again = CollapseMonitor(monitor.thresholds)
    again.load_state_dict(monitor.state_dict())
    assert again.measure(squash, _batches(val, labels)).metrics == report.metrics
    # a threshold set to None is off
    off = CollapseMonitor(CollapseThresholds(None, None, None, None, reference_images=32))
    off.load_state_dict(monitor.state_dict())
    assert not off.measure(squash, _batches(val, labels)).collapsed
