"""Promotion gates, the Prefect ``promote`` flow on a real registry, ``adaptad predict`` and ``mlflow models
serve`` on the champion."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image

from components.data import scan_mvtec
from flows.cli import main
from flows.params import Gates, load_params
from flows.promote import decide, promote_category, run_promote
from flows.tracking import log_run
from tests.test_tracking import copy_with_key, free_port, make_decision, make_run_folder, write_params

MODEL = "adaptad-mini-kolektorsdd"
GATES = Gates(min_image_auroc=0.6, min_improvement=0.01, max_pixel_auroc_drop=0.02, max_aupro_drop=0.02)


# --- decide(): pure -----------------------------------------------------------------------------------------
def m(image, pixel=0.9, aupro=0.8, data="v1") -> dict:
    return {"image_auroc": image, "pixel_auroc": pixel, "aupro": aupro, "data_version": data}


def test_decide_without_champion_checks_the_floor_only() -> None:
    ok = decide(m(0.7), None, GATES)
    assert ok.promote and any("no comparable champion" in r for r in ok.reasons)
    low = decide(m(0.55), None, GATES)
    assert not low.promote and any("< minimum 0.6000" in r for r in low.reasons)
    assert not decide(m(math.nan), None, GATES).promote
    assert not decide({}, None, GATES).promote


def test_decide_against_a_champion() -> None:
    assert decide(m(0.82), m(0.80), GATES).promote
    small = decide(m(0.805), m(0.80), GATES)  # below min_improvement
    assert not small.promote and any("required +0.0100" in r for r in small.reasons)
    pixel = decide(m(0.9, pixel=0.85), m(0.8, pixel=0.9), GATES)
    assert not pixel.promote and any("pixel AUROC drops by 0.0500" in r for r in pixel.reasons)
    aupro = decide(m(0.9, aupro=0.7), m(0.8, aupro=0.8), GATES)
    assert not aupro.promote and any("AUPRO drops" in r for r in aupro.reasons)
    assert decide(m(0.9, pixel=0.89, aupro=0.79), m(0.8), GATES).promote  # drops within the limits
    assert decide(m(0.82), m(0.80), {"min_image_auroc": 0.5, "min_improvement": 0.0,
                                     "max_pixel_auroc_drop": 0, "max_aupro_drop": 0}).promote  # fmt: skip


def test_decide_is_nan_aware_and_checks_the_data_version() -> None:
    nan_pixels = decide(m(0.9, pixel=math.nan, aupro=math.nan), m(0.8), GATES)
    assert nan_pixels.promote and sum("not compared" in r for r in nan_pixels.reasons) == 2
    other_data = decide(m(0.7), m(0.99, data="v0"), GATES)
    assert other_data.promote and any(
        "data version v0" in r and "not comparable" in r for r in other_data.reasons
    )
    assert not decide(m(0.5), m(0.3, data="v0"), GATES).promote  # still needs the floor


def test_decide_gates_the_operating_point_when_asked() -> None:
    gates = GATES.model_copy(update={"max_image_fpr": 0.1, "min_image_recall": 0.8})
    good = m(0.9) | {"image_fpr": 0.05, "image_recall": 0.85}
    assert decide(good, None, gates).promote and decide(good, None, GATES).promote
    noisy = decide(good | {"image_fpr": 0.2}, None, gates)
    assert not noisy.promote and any(
        "false-alarm rate at the threshold 0.2000 fails" in r for r in noisy.reasons
    )
    blind = decide(good | {"image_recall": 0.5}, None, gates)
    assert not blind.promote and any("recall at the threshold 0.5000 fails" in r for r in blind.reasons)
    undecided = decide(m(0.9), None, gates)  # a version registered without thresholds
    assert not undecided.promote and any("unknown (no decision)" in r for r in undecided.reasons)
    assert decide(m(0.9), None, GATES).promote  # unset gates check nothing


# --- real registry ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def services(tmp_path_factory):
    """MLflow without telemetry; Prefect's ephemeral API with its own home (settings and environment)."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        updates = {
            PREFECT_HOME: str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180,
        }
        with temporary_settings(updates=updates):
            yield
            from prefect.server.api.server import SubprocessASGIServer

            # stop this home's ephemeral API now, not at exit after pytest closed the captured streams
            SubprocessASGIServer().stop()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """Two real run folders: ImageNet features (good) and a random backbone (bad)."""
    runs = tmp_path_factory.mktemp("runs")
    good = make_run_folder(data_root, runs / "good", "key-good")
    bad = make_run_folder(data_root, runs / "bad", "key-bad", weights="none")
    g, b = (json.loads((f / "metrics.json").read_text())["metrics"] for f in (good, bad))
    # the directions the promotion scenario relies on
    assert g["image_auroc"] > b["image_auroc"] + 0.05
    assert g["pixel_auroc"] >= b["pixel_auroc"] - 0.02 and g["aupro"] >= b["aupro"] - 0.02
    return good, bad


def scenario_params(tmp_path: Path, data_root: Path, **extra) -> tuple[Path, dict]:
    path = write_params(tmp_path / "params.yaml", data_root, tmp_path / "store")
    overrides = {
        "promote.gates.min_image_auroc": 0.0,  # the random-backbone model may be the first champion
        "promote.decisions_file": str(tmp_path / "metrics" / "promotion.json"),
        **extra,
    }
    return path, overrides


def read_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created).data


def test_promotion_sequence_through_the_prefect_flow(folders, data_root, tmp_path) -> None:
    good, bad = folders
    path, overrides = scenario_params(tmp_path, data_root)
    params = load_params(path, overrides)
    client = MlflowClient(params.mlflow.tracking_uri)
    decisions_file = tmp_path / "metrics" / "promotion.json"

    # 1. the first challenger becomes champion: there is none yet (real Prefect flow)
    first = log_run(bad, params)
    decided = run_promote(str(path), overrides)["kolektorsdd"]
    assert decided["decision"] == "promoted" and decided["champion_version"] == first["version"] == "1"
    assert any("no comparable champion" in r for r in decided["reasons"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert json.loads(decisions_file.read_text())["kolektorsdd"]["promoted"] is True
    assert "| kolektorsdd | promoted |" in read_artifact("promotion-mini")

    # 2. a better challenger becomes champion
    second = log_run(good, params)
    better = promote_category(client, MODEL, params.promote.gates)
    assert better["decision"] == "promoted" and better["champion_version"] == second["version"] == "2"
    v2 = client.get_model_version(MODEL, "2")
    assert v2.tags["promotion.decision"] == "promoted" and v2.tags["promotion.compared_with"].startswith(
        "version 1"
    )
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"

    # 3. a worse challenger is refused: champion unchanged, the decision recorded on the challenger
    third = log_run(copy_with_key(bad, tmp_path / "bad-again", "key-bad-again"), params)
    refused = run_promote(str(path), overrides)["kolektorsdd"]
    assert refused["decision"] == "refused" and refused["changed"] and third["version"] == "3"
    assert refused["champion_version"] == "2" and refused["challenger_version"] == "3"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "3"
    v3 = client.get_model_version(MODEL, "3")
    assert v3.tags["promotion.decision"] == "refused"
    assert "image AUROC change -" in v3.tags["promotion.reasons"]
    assert v3.tags["promotion.compared_with"] == "version 2 (champion)" and v3.tags["promotion.at"]
    assert "## Promotion decision" in v3.description and "**refused**" in v3.description
    assert "| image_auroc |" in v3.description  # the reviewer's section from log_run is kept
    entry = json.loads(decisions_file.read_text())["kolektorsdd"]
    assert entry["promoted"] is False and entry["champion_version"] == 2 and entry["challenger_version"] == 3
    assert all(isinstance(v, bool | int | float) for v in entry.values())  # DVC metrics
    assert "| kolektorsdd | refused |" in read_artifact("promotion-mini")

    # 4. the same challenger again: a no-op
    again = promote_category(client, MODEL, params.promote.gates)
    assert again["decision"] == "refused" and not again["changed"]
    assert client.get_model_version(MODEL, "3").tags["promotion.at"] == v3.tags["promotion.at"]


def test_category_without_challenger_is_reported(data_root, tmp_path) -> None:
    path, overrides = scenario_params(tmp_path, data_root)
    params = load_params(path, overrides)
    result = promote_category(MlflowClient(params.mlflow.tracking_uri), MODEL, params.promote.gates)
    assert result["decision"] == "no challenger" and not result["promoted"]


def test_approval_pauses_the_flow_for_a_reviewer(folders, data_root, tmp_path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    good, _ = folders
    path, overrides = scenario_params(
        tmp_path, data_root, **{"promote.require_approval": True, "promote.approval_timeout_seconds": 120}
    )
    log_run(good, load_params(path, overrides))
    result: dict = {}
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:  # the ephemeral API is up before the flow's thread starts
        assert not client.read_flow_runs(flow_run_filter=paused)
        worker = threading.Thread(
            target=lambda: result.update(run_promote(str(path), overrides)), daemon=True
        )
        worker.start()
        deadline = time.monotonic() + 90
        while not (runs := client.read_flow_runs(flow_run_filter=paused)):
            assert worker.is_alive() and time.monotonic() < deadline, "the promote flow never paused"
            time.sleep(0.5)
    assert MlflowClient(load_params(path, overrides).mlflow.tracking_uri).get_registered_model(
        MODEL
    ).aliases == {"challenger": 1}  # not promoted while waiting
    resume_flow_run(runs[0].id, run_input={"approve": True, "comment": "heat maps look right"})
    worker.join(60)
    decided = result["kolektorsdd"]
    assert (
        decided["decision"] == "promoted"
        and "approved by a reviewer (heat maps look right)" in decided["reasons"]
    )


# --- predict and serve the champion -------------------------------------------------------------------------
def champion_decision(tracking_uri: str) -> Path:
    """The decision folder the champion fixture registered with (beside its store)."""
    return Path(tracking_uri.removeprefix("sqlite:///")).parents[1] / "decision"


@pytest.fixture(scope="module")
def champion(folders, data_root, tmp_path_factory) -> str:
    """A registry whose champion is the good model, registered with its decision; returns the tracking URI."""
    tmp = tmp_path_factory.mktemp("champion")
    params = load_params(write_params(tmp / "params.yaml", data_root, tmp / "store"))
    log_run(folders[0], params, make_decision(data_root, folders[0], tmp / "decision"))
    assert promote_category(MlflowClient(params.mlflow.tracking_uri), MODEL, params.promote.gates)["promoted"]
    return params.mlflow.tracking_uri


def test_predict_cli_writes_scores_and_heatmaps(champion, folders, data_root, tmp_path, capsys) -> None:
    test = [s for s in scan_mvtec(data_root, "kolektorsdd") if s.split == "test"]
    chosen = [test[0], test[-1]]
    out = tmp_path / "pred"
    argv = ["predict", "--model", f"models:/{MODEL}@champion", *(s.path for s in chosen)]
    assert main([*argv, "--output", str(out), "--tracking-uri", champion]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [s.path for s in chosen]
    evaluated = dict(
        zip(
            *pq.read_table(folders[0] / "scores.parquet", columns=["path", "score"]).to_pydict().values(),
            strict=True,
        )
    )
    # the champion carries the thresholds it was registered with (its decision.json), and its version the
    # figures at them: tags the promotion gates read, a section of the description a reviewer reads
    decision = json.loads((champion_decision(champion) / "decision.json").read_text())
    decided = decision["calibration"]
    version = MlflowClient(champion).get_model_version_by_alias(MODEL, "champion")
    assert float(version.tags["image_fpr"]) == decision["metrics"]["image_fpr"]
    assert float(version.tags["image_threshold"]) == decided["image"]["value"]
    assert (
        "**Operating point** set without test labels: rule `normal_quantile` at false-alarm rate 0.2 on 5"
        in (version.description)
    )
    for row, sample in zip(rows, chosen, strict=True):
        assert float(row["score"]) == pytest.approx(evaluated[sample.path], rel=1e-4)
        heatmap = out / f"{Path(sample.path).stem}_heatmap.png"
        assert row["heatmap"] == heatmap.name
        with Image.open(heatmap) as png, Image.open(sample.path) as original:
            assert png.mode == "RGB" and png.size == original.size
        anomalous = float(row["score"]) > decided["image"]["value"]
        assert row["label"] == ("anomalous" if anomalous else "normal")
        assert (float(row["score_normalized"]) > 0.5) == anomalous
        with Image.open(out / row["mask"]) as mask, Image.open(sample.path) as original:
            assert mask.size == original.size and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scores.csv"]
        + [f"{Path(s.path).stem}_heatmap.png" for s in chosen]
        + [f"{Path(s.path).stem}_mask.png" for s in chosen]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]  # no temp folder left


def test_predict_a_version_without_thresholds_answers_scores_only(
    folders, data_root, tmp_path, capsys
) -> None:
    """A version registered without a decision (before thresholds existed, or by hand) still predicts:
    scores and heat maps on the call's own colour scale, no labels and no masks."""
    params = load_params(write_params(tmp_path / "params.yaml", data_root, tmp_path / "store"))
    logged = log_run(folders[1], params)
    image = next(s for s in scan_mvtec(data_root, "kolektorsdd") if s.split == "test")
    out = tmp_path / "pred"
    argv = ["predict", "--model", f"models:/{MODEL}/{logged['version']}", image.path, "--output", str(out)]
    assert main([*argv, "--tracking-uri", params.mlflow.tracking_uri]) == 0
    capsys.readouterr()
    with (out / "scores.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert set(row) == {"path", "score", "heatmap"} and float(row["score"]) > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scores.csv", f"{Path(image.path).stem}_heatmap.png"]
    )
    version = MlflowClient(params.mlflow.tracking_uri).get_model_version(MODEL, logged["version"])
    assert version.tags["image_fpr"] == "nan" and "**Operating point** none" in version.description


def test_predict_bad_input_exits_2_and_writes_nothing(champion, data_root, tmp_path, capsys) -> None:
    good_image = next((data_root / "kolektorsdd" / "test" / "good").iterdir())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    closed = f"http://127.0.0.1:{free_port()}"
    cases = [
        (
            [str(tmp_path / "missing.png")],
            f"models:/{MODEL}@champion",
            champion,
            "missing.png: file not found",
        ),
        ([str(corrupt)], f"models:/{MODEL}@champion", champion, "corrupt.png: "),
        ([str(good_image)], f"models:/{MODEL}@nope", champion, f"--model models:/{MODEL}@nope: "),
        (
            [str(good_image)],
            "models:/no-such-model@champion",
            champion,
            "--model models:/no-such-model@champion: ",
        ),
        (
            [str(good_image)],
            f"models:/{MODEL}@champion",
            closed,
            f"mlflow tracking URI {closed}: unreachable",
        ),
        (
            [str(good_image)],
            f"models:/{MODEL}@champion",
            f"sqlite:///{tmp_path / 'absent.db'}",
            "no database file",
        ),
    ]
    for images, model, uri, expected in cases:
        code = main(["predict", "--model", model, *images, "--output", str(out), "--tracking-uri", uri])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("adaptad: error: ") and expected in err and "\n" not in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.png"]


def test_mlflow_models_serve_answers_invocations(champion, folders, data_root) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
    }
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"mlflow models serve exited: {proc.stdout.read()[-2000:]}"
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        test = [s for s in scan_mvtec(data_root, "kolektorsdd") if s.split == "test"][:2]
        rows = [[base64.b64encode(Path(s.path).read_bytes()).decode()] for s in test]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = json.load(r)["predictions"]
        evaluated = dict(
            zip(
                *pq.read_table(folders[0] / "scores.parquet", columns=["path", "score"]).to_pydict().values(),
                strict=True,
            )
        )
        assert len(predictions) == 2
        threshold = json.loads((champion_decision(champion) / "decision.json").read_text())["calibration"]
        for p, s in zip(predictions, test, strict=True):
            assert p["size"] == 96 and len(p["anomaly_map"]) == 96 * 96
            assert p["score"] == pytest.approx(evaluated[s.path], rel=1e-4)
            # the same decision as predict: label, normalized score and map, defect mask
            assert p["label"] == ("anomalous" if p["score"] > threshold["image"]["value"] else "normal")
            assert (p["score_normalized"] > 0.5) == (p["label"] == "anomalous")
            above = np.asarray(p["anomaly_map"]) > threshold["pixel"]["value"]
            assert np.array_equal(np.asarray(p["defect_mask"]) == 1, above)
            assert np.array_equal(np.asarray(p["map_normalized"]) > 0.5, above)
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", bad, {"Content-Type": "application/json"}
                ),
                timeout=30,
            )
        assert err.value.code == 400
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_calibrate_registers_new_thresholds_without_retraining(
    champion, industrial_root, tmp_path, capsys
) -> None:
    """New normal images (kolektorsdd train images the model never saw) set new thresholds: a new version
    with the same weights and memory, alias challenger; bad input registers nothing."""
    client = MlflowClient(champion)
    source = client.get_model_version_by_alias(MODEL, "champion")
    new = tmp_path / "new"
    new.mkdir()
    for path in sorted((industrial_root / "kolektorsdd" / "train" / "good").iterdir())[200:230]:
        shutil.copy(path, new / path.name)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    argv = ["calibrate", "--model", f"models:/{MODEL}@champion", "--tracking-uri", champion]

    empty, corrupt, few = tmp_path / "empty", tmp_path / "corrupt", tmp_path / "few"
    empty.mkdir()
    shutil.copytree(new, corrupt)
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    few.mkdir()
    for path in sorted(new.iterdir())[:5]:
        shutil.copy(path, few / path.name)
    for images, extra, needle in [
        (empty, [], "--images " + str(empty) + ": no image files"),
        (corrupt, [], "broken.png"),
        (few, [], "5 images; rule normal_quantile at false-alarm rate 0.05 needs at least 20"),
        (
            new,
            ["--false-alarm-rate", "0.01"],
            "30 images; rule normal_quantile at false-alarm rate 0.01 needs at least 100",
        ),
        (new, ["--model", "models:/no-such-model@champion"], "--model models:/no-such-model@champion: "),
    ]:
        assert main([*argv, "--images", str(images), *extra]) == 2
        assert needle in capsys.readouterr().err
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before  # nothing registered

    assert main([*argv, "--images", str(new), "--false-alarm-rate", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source_version"] == str(source.version) and out["images"] == 30
    version = client.get_model_version(MODEL, out["version"])
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == out["version"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == str(
        source.version
    )  # unchanged
    assert (
        version.tags["recalibrated_from"] == str(source.version)
        and version.tags["run_key"] == source.tags["run_key"]
    )
    assert version.tags["image_auroc"] == source.tags["image_auroc"] and version.tags["image_fpr"] == "nan"
    assert "Re-calibrated from version" in version.description and "no retraining" in version.description
    assert (
        float(version.tags["image_threshold"])
        == out["image_threshold"]
        != float(source.tags["image_threshold"])
    )
    # the new version scores as the old one (same weights and memory) and decides with the new thresholds
    import mlflow

    frame = pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in sorted(new.iterdir())[:3]]}
    )
    old_model, new_model = (
        mlflow.pyfunc.load_model(f"models:/{MODEL}/{v}") for v in (source.version, out["version"])
    )
    old, fresh = old_model.predict(frame), new_model.predict(frame)
    assert np.allclose(old["score"], fresh["score"])
    assert (fresh["label"] == np.where(fresh["score"] > out["image_threshold"], "anomalous", "normal")).all()
    assert 0.0 <= out["held_out_false_alarm_rate"] <= 0.1
