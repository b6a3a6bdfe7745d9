"""Selection regret from recorded per-epoch values (components/selection.py; pure)."""

from __future__ import annotations

import pytest

from components.selection import choose_trial, regret_table, selection_record, trial_signal

HISTORY = [{"epoch": 1, "val_auroc": 0.70}, {"epoch": 2, "val_auroc": 0.74}, {"epoch": 3, "val_auroc": 0.72}]


def test_the_regret_is_the_best_minus_the_kept_test_auroc() -> None:
    record = selection_record({0: 0.80, 1: 0.85, 2: 0.83, 3: 0.90}, HISTORY, 2, "val_auroc", 0.69)
    assert record["kept_epoch"] == 2 and record["best_test_epoch"] == 3
    assert record["regret"] == pytest.approx(0.90 - 0.83)
    assert [r["signal"] for r in record["epochs"]] == [0.69, 0.70, 0.74, 0.72]
    assert [r["test_image_auroc"] for r in record["epochs"]] == [0.80, 0.85, 0.83, 0.90]


def test_a_method_that_keeps_the_last_epoch_has_no_signal() -> None:
    record = selection_record({1: 0.6, 2: 0.7}, HISTORY[:2], 2, None)
    assert record["signal"] == "last epoch" and record["regret"] == 0.0
    assert all(r["signal"] is None for r in record["epochs"])


def test_ties_name_the_earliest_best_epoch_and_cost_nothing() -> None:
    record = selection_record({0: 0.9, 1: 0.9, 2: 0.8}, HISTORY[:2], 1, "val_auroc")
    assert record["best_test_epoch"] == 0 and record["regret"] == 0.0


def test_a_kept_epoch_without_weights_is_an_error() -> None:
    with pytest.raises(ValueError, match="kept epoch 4 has no recorded weights"):
        selection_record({0: 0.5, 1: 0.6}, HISTORY, 4, "val_auroc")


def test_the_table_groups_runs() -> None:
    runs = [
        {
            "method": "panda",
            "kept_epoch": 0,
            "regret": 0.02,
            "kept_test_image_auroc": 0.8,
            "best_test_image_auroc": 0.82,
        },
        {
            "method": "panda",
            "kept_epoch": 3,
            "regret": 0.0,
            "kept_test_image_auroc": 0.9,
            "best_test_image_auroc": 0.9,
        },
        {
            "method": "gaussian_ft",
            "kept_epoch": 1,
            "regret": 0.1,
            "kept_test_image_auroc": 0.7,
            "best_test_image_auroc": 0.8,
        },
    ]
    table = {g["group"]: g for g in regret_table(runs, lambda r: r["method"])}
    assert table["panda"]["runs"] == 2 and table["panda"]["mean_regret"] == pytest.approx(0.01)
    assert table["panda"]["kept_epoch_0"] == 1 and table["panda"]["kept_best"] == 1
    assert table["gaussian_ft"]["max_regret"] == pytest.approx(0.1)


def _summary(**kw) -> dict:
    base = {"selection_signal": "val_auroc", "kept_epoch": 2, "epochs": 3, "pretrained_signal": 0.6}
    return base | {"history": HISTORY} | kw


def test_a_trial_is_compared_on_its_signal_at_the_kept_epoch() -> None:
    assert trial_signal(_summary()) == 0.74
    assert trial_signal(_summary(kept_epoch=0)) == 0.6  # the pretrained weights were kept
    assert trial_signal(_summary(kept_epoch=0), "loss") is None  # measured on epochs only
    assert trial_signal(_summary(collapsed={"epoch": 2, "reason": "rank"})) is None
    with pytest.raises(ValueError, match=r"tune\.metric"):
        trial_signal(_summary(selection_signal=None))


def test_the_best_signal_is_chosen_and_unmeasured_trials_never() -> None:
    assert choose_trial([0.7, None, 0.9, 0.9]) == 2  # ties: the first
    assert choose_trial([0.7, 0.5], "min") == 1
    with pytest.raises(ValueError, match="no trial"):
        choose_trial([None, None])
