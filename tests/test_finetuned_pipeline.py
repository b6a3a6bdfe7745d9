"""Every fine-tuned method through the real pipeline — Prefect flow (ephemeral API), Ray Train job with 2
DDP workers, faiss banks, metrics, MLflow run and registered version — on small subsets of the shared
industrial data sets, plus a deliberately collapsing run that the collapse monitor must stop.

All runs share one process (tests/flow_runner.py), so the services start once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_in_one_process, service_env, two_category_params

SIZE = 64
BOTH = ["kolektorsdd", "magnetic_tile"]
#: the categories each run covers: TPTL trains one model for both; the others need one each (CI time)
CATEGORIES = {
    "gaussian_ft": ["kolektorsdd"],
    "collapse": ["magnetic_tile"],
    "panda_oe": ["magnetic_tile"],
    "topology": BOTH,
    "recontrast": ["kolektorsdd"],
    "tune": ["kolektorsdd"],
    "adapted": BOTH,
    "collapsed_adapter": ["magnetic_tile"],
    "tuned_adapter": ["kolektorsdd"],
}
#: runs that share another run's folder (and so its training jobs)
RUNS_DIR = {"adapted": "topology", "collapsed_adapter": "collapse", "tuned_adapter": "tune"}
COLLAPSING_PANDA = {
    # no clipping, no EWC, no early stopping and a huge learning rate: the features blow up
    "epochs": 4,
    "lr": 0.3,
    "max_grad_norm": None,
    "ewc": False,
    "early_stopping": False,
    "gallery": 2,
    "reference_images": 8,
}
#: a 2-trial Ray Tune search of PANDA's learning rate, chosen on the validation slice
TUNED_PANDA = {
    "methods.panda": {"epochs": 1, "early_stopping": False, "gallery": 2, "reference_images": 8},
    "tune.space": {"lr": [0.01, 0.001]},
}
RUNS = {
    "gaussian_ft": {
        "method": "gaussian_ft",
        # patience 1 and an unreachable min_delta: the forgetting detector must stop it after epoch 1
        "methods.gaussian_ft": {"epochs": 4, "patience": 1, "min_delta": 1.0, "gaussian_images": 12},
    },
    "collapse": {"method": "panda", "methods.panda": COLLAPSING_PANDA},
    "panda_oe": {"method": "panda_oe", "methods.panda_oe": {"epochs": 2, "lr": 0.01, "gallery": 2}},
    "topology": {"method": "topology", "methods.topology": {"epochs": 2, "lr": 1e-3, "anchor_batch": 4}},
    "recontrast": {
        "method": "recontrast",
        "methods.recontrast": {"epochs": 2, "bottleneck_blocks": 1, "decoder_blocks": [1, 1, 1]},
    },
    "tune": {"method": "panda", **TUNED_PANDA},
    # PatchCore on the backbone TPTL adapted: the topology run's training job, found by its run key
    "adapted": {
        "method": "patchcore",
        "adapted_by": "topology",
        "methods.topology": {"epochs": 2, "lr": 1e-3, "anchor_batch": 4},
    },
    # PatchCore on the backbone of the collapse run's training job (found by its run key): collapsed
    "collapsed_adapter": {"method": "patchcore", "adapted_by": "panda", "methods.panda": COLLAPSING_PANDA},
    # PatchCore on the backbone of the tune run's chosen trial (the tune's training job, by its run key)
    "tuned_adapter": {"method": "patchcore", "adapted_by": "panda", **TUNED_PANDA},
}


def dotted(overrides: dict) -> dict:
    """{"methods.x": {"a": 1}} -> {"methods.x.a": 1}: each knob overridden, the others kept."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    return flat


@pytest.fixture(scope="module")
def runs(tmp_path_factory, industrial_root):
    """Prepare a two-category dataset, then run every method of RUNS through the pipeline flow."""
    home = tmp_path_factory.mktemp("finetuned")
    params = two_category_params(industrial_root, home, (20, 6, 6, 2), SIZE)
    outliers = home / "outliers"  # outlier exposure set for panda_oe: deeppcb images, another product
    outliers.mkdir()
    for image in sorted((industrial_root / "deeppcb" / "train" / "good").iterdir())[:16]:
        shutil.copy(image, outliers / image.name)
    params["methods"].setdefault("panda_oe", {})["outliers"] = str(outliers)
    params["train"].update(batch_size=8, storage=str(home / "ray"))
    params["pipeline"].update(
        retries=0,
        runs_dir=str(home / "runs"),
        metrics_file=str(home / "metrics.json"),
        plots_dir=str(home / "plots"),
    )
    params["mlflow"].update(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "art"))
    path = home / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = service_env(home)
    subprocess.run(["adaptad", "prepare", "--params", str(path)], env=env, check=True, capture_output=True)
    overrides = [
        {
            "pipeline.runs_dir": str(home / "runs" / RUNS_DIR.get(n, n)),
            "datasets.two.categories": CATEGORIES[n],
        }
        | dotted(o)
        for n, o in RUNS.items()
    ]
    lines, out = run_in_one_process("flow_runner", path, overrides, env, "FLOW-RESULT", timeout=1800)
    return home, dict(zip(RUNS, lines, strict=True)), out


def _client(home: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def _run_folders(home: Path, name: str) -> list[Path]:
    return sorted(
        p for p in (home / "runs" / name).iterdir() if (p / "evaluation" / "metrics.json").is_file()
    )


def _trainings(home: Path, name: str) -> list[dict]:
    """The summaries of the run's training jobs (one per category, one per dataset for TPTL)."""
    folders = [p / "trained" for p in (home / "runs" / name).iterdir() if (p / "trained").is_dir()]
    return [json.loads((f / "summary.json").read_text()) for f in sorted(folders)]


def _versions(home: Path, method: str, categories: list[str] = BOTH) -> list:
    client = _client(home)
    return [
        v
        for c in categories
        for v in client.search_model_versions(f"name='adaptad-two-{c}'")
        if v.tags.get("method") == method
    ]


@pytest.mark.parametrize("name", ["gaussian_ft", "panda_oe", "topology", "recontrast"])
def test_each_finetuned_method_trains_scores_and_registers(runs, name) -> None:
    home, results, _ = runs
    r = results[name]
    assert r["error"] is None, r
    assert sorted(r["result"]) == CATEGORIES[name]
    for category in CATEGORIES[name]:
        m = r["result"][category]
        assert 0 <= m["image_auroc"] <= 1 and 0 <= m["aupro"] <= 1
        assert m["pixel_auroc"] > 0.6, (name, category, m)  # real defects are localised
    summaries = _trainings(home, name)
    assert len(summaries) == (1 if name == "topology" else len(CATEGORIES[name]))
    for summary in summaries:
        assert summary["workers"] == 2 and summary["epochs"] >= 1 and not summary["collapsed"]
        assert [row["epoch"] for row in summary["monitor"]] == list(range(summary["epochs"] + 1))
    versions = _versions(home, name)
    assert len(versions) == len(CATEGORIES[name]), versions  # one per category
    assert all("Collapse monitor" in v.description and "healthy" in v.description for v in versions)


def test_the_newest_version_of_each_category_is_the_challenger(runs) -> None:
    home, _, _ = runs
    client = _client(home)
    for category in BOTH:
        name = f"adaptad-two-{category}"
        newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        assert int(client.get_model_version_by_alias(name, "challenger").version) == newest


def test_gaussian_ft_stops_by_its_forgetting_detector(runs) -> None:
    home, _, _ = runs
    for summary in _trainings(home, "gaussian_ft"):
        assert summary["stopped_early"] and summary["epochs"] == 1  # patience 1, nothing beats min_delta
        assert all("val_separation" in row for row in summary["history"])
        assert summary["tags"]["gaussian_ft.val_separation_pretrained"]


def test_topology_trains_one_model_for_the_whole_dataset(runs) -> None:
    home, _, _ = runs
    trained = [p for p in (home / "runs" / "topology").iterdir() if (p / "trained").is_dir()]
    assert len(trained) == 1  # one training job, two categories evaluated with it
    methods = [_record(p)["method"] for p in _run_folders(home, "topology")]
    assert methods.count("topology") == 2


def _record(run: Path) -> dict:
    return json.loads((run / "evaluation" / "metrics.json").read_text())


def test_a_frozen_method_on_an_adapted_backbone_reuses_its_training_and_registers(runs) -> None:
    """PatchCore with adapted_by=topology builds its banks on the backbone of the topology run's training
    job (the same run key: not trained again), is scored, logged with the adapter and registered."""
    from safetensors.torch import load_file

    from components.backbones import offline_weights_file

    home, results, _ = runs
    r = results["adapted"]
    assert r["error"] is None, r
    assert sorted(r["result"]) == BOTH
    (trained,) = [p / "trained" for p in (home / "runs" / "topology").iterdir() if (p / "trained").is_dir()]
    adapted = [p for p in _run_folders(home, "topology") if _record(p)["method"] == "patchcore"]
    assert sorted(p.name for p in adapted) == sorted(r["result"][c]["run_key"] for c in BOTH)
    pretrained = load_file(str(offline_weights_file("tf_efficientnet_lite0")))
    adapted_weights = load_file(str(trained / "backbone.safetensors"))
    for run in adapted:
        record, train = _record(run), json.loads((run / "evaluation" / "train.json").read_text())
        assert record["spec"]["weights"] == str(trained.resolve() / "backbone.safetensors")
        assert (
            train["tags"]["adapted_by"] == "topology"
            and train["adapted_by"]["run_key"] == trained.parent.name
        )
        assert record["metrics"]["train_seconds"] > 0 and 0 <= record["metrics"]["image_auroc"] <= 1
        saved = load_file(str(run / "evaluation" / "method" / "backbone.safetensors"))
        assert saved and all(
            saved[k].equal(adapted_weights[k]) for k in saved
        )  # TPTL's weights, not ImageNet's
        assert any(not saved[k].equal(pretrained[k]) for k in saved if k in pretrained)
    client = _client(home)
    runs_ = [client.get_run(v.run_id) for v in _versions(home, "patchcore")]
    on_topology = [run for run in runs_ if run.data.tags["adapted_by"] == "topology"]
    assert len(on_topology) == 2  # one per category (the other PatchCore version is on PANDA's backbone)
    for run in on_topology:
        assert run.data.params["adapted_by"] == "topology" and run.data.params["topology.lr"] == "0.001"


def test_the_collapse_monitor_stops_tags_and_never_registers_a_collapsing_run(runs) -> None:
    home, results, _ = runs
    r = results["collapse"]
    assert r["error"] is None, r  # collapse is a result, not a crash
    for summary in _trainings(home, "collapse"):
        assert summary["collapsed"] and summary["epochs"] < 4, summary["monitor"]  # stopped before the end
        assert summary["collapsed"]["epoch"] == summary["epochs"]
    assert _versions(home, "panda", CATEGORIES["collapse"]) == []  # never a challenger, not even a version
    client = _client(home)
    (experiment,) = [e for e in client.search_experiments() if e.name == "adaptad-two"]
    collapsed = client.search_runs([experiment.experiment_id], "tags.collapsed = 'true'")
    assert {run.data.tags["category"] for run in collapsed} == set(CATEGORIES["collapse"])
    assert all("COLLAPSED" in run.data.tags["mlflow.note.content"] for run in collapsed)
    assert all("train/monitor/effective_rank" in run.data.metrics for run in collapsed)


def test_a_frozen_method_on_a_collapsed_adapter_is_neither_evaluated_nor_registered(runs) -> None:
    """The adapter's collapse verdict is the composed run's: no metrics, no version, an MLflow run tagged
    collapsed that names the adapter — and the adapter is not trained again."""
    home, results, _ = runs
    r = results["collapsed_adapter"]
    assert r["error"] is None, r  # collapse is a result, not a crash
    assert len(_trainings(home, "collapse")) == len(CATEGORIES["collapse"])  # the collapse run's job only
    (record,) = [_record(p) for p in _run_folders(home, "collapse") if _record(p)["method"] == "patchcore"]
    assert record["collapsed"]["reason"] and record["spec"]["weights"].endswith("backbone.safetensors")
    assert all(
        record["metrics"][k] != record["metrics"][k] for k in ("image_auroc", "aupro")
    )  # NaN: unscored
    client = _client(home)
    versions = _versions(home, "patchcore", CATEGORIES["collapsed_adapter"])
    assert all(client.get_run(v.run_id).data.tags["adapted_by"] == "topology" for v in versions)
    (experiment,) = [e for e in client.search_experiments() if e.name == "adaptad-two"]
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.collapsed = 'true' and tags.adapted_by = 'panda'"
    )
    assert run.data.tags["category"] == "magnetic_tile" and run.data.params["adapted_by"] == "panda"
    assert "COLLAPSED" in run.data.tags["mlflow.note.content"]


def test_a_tune_trains_every_trial_and_registers_only_the_chosen_one(runs) -> None:
    from components.selection import choose_trial

    home, results, _ = runs
    assert results["tune"]["error"] is None, results["tune"]
    (key_dir,) = [p for p in (home / "runs" / "tune").iterdir() if (p / "trained").is_dir()]
    summary = json.loads((key_dir / "trained" / "summary.json").read_text())
    tune = summary["tune"]
    assert [t["knobs"] for t in tune["trials"]] == [{"lr": 0.01}, {"lr": 0.001}]
    assert tune["metric"] == "val_auroc" and all(t["kept_epoch"] == 1 for t in tune["trials"])
    assert tune["chosen"] == choose_trial([t["signal"] for t in tune["trials"]], "max")
    chosen = tune["trials"][tune["chosen"]]
    assert tune["knobs"] == chosen["knobs"]
    trial_dir = key_dir / "trials" / chosen["run_key"]
    for t in tune["trials"]:  # every trial trained, under its own run key, as a Ray Tune trial
        assert (key_dir / "trials" / t["run_key"] / "summary.json").is_file()
    assert (home / "ray" / f"{key_dir.name}-tune").is_dir()
    kept = (key_dir / "trained" / "backbone.safetensors").read_bytes()
    assert kept == (trial_dir / "backbone.safetensors").read_bytes()  # the chosen trial's weights
    record = json.loads((key_dir / "evaluation" / "metrics.json").read_text())
    assert record["spec"]["params"]["lr"] == chosen["knobs"]["lr"]  # evaluated with the kept knobs
    (version,) = _versions(home, "panda", CATEGORIES["tune"])  # one version: only the chosen model
    assert "chosen by tune: trial" in version.description
    run = _client(home).get_run(version.run_id)
    assert run.data.params["tune.trials"] == "2"
    assert float(run.data.params["tune.chosen.lr"]) == chosen["knobs"]["lr"]
    assert float(run.data.params["panda.lr"]) == chosen["knobs"]["lr"]


def test_a_frozen_method_on_a_tuned_adapter_takes_the_chosen_trials_backbone(runs) -> None:
    """With tune.space, the adapter's training job is the tune; PatchCore builds on its chosen trial's
    backbone (the tune is not run again) and is registered with the adapter's kept knobs."""
    home, results, _ = runs
    r = results["tuned_adapter"]
    assert r["error"] is None, r
    (key_dir,) = [p for p in (home / "runs" / "tune").iterdir() if (p / "trained").is_dir()]
    tune = json.loads((key_dir / "trained" / "summary.json").read_text())["tune"]
    (run_dir,) = [p for p in _run_folders(home, "tune") if _record(p)["method"] == "patchcore"]
    assert _record(run_dir)["spec"]["weights"] == str(
        (key_dir / "trained" / "backbone.safetensors").resolve()
    )
    assert (run_dir / "evaluation" / "method" / "backbone.safetensors").is_file()
    client = _client(home)
    runs_ = [client.get_run(v.run_id) for v in _versions(home, "patchcore", CATEGORIES["tuned_adapter"])]
    (run,) = [run for run in runs_ if run.data.tags["adapted_by"] == "panda"]  # and one on TPTL's
    assert run.data.params["tune.trials"] == "2"
    assert float(run.data.params["panda.lr"]) == tune["trials"][tune["chosen"]]["knobs"]["lr"]
