"""The pipeline flow itself (real Prefect engine, ephemeral API; MLflow on sqlite): a failing category
does not stop the others, the flow ends failed naming it, and nothing is registered for it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.conftest import copy_subset, service_env


def test_a_failing_category_fails_the_flow_by_name_and_the_others_finish(
    tmp_path: Path, industrial_root
) -> None:
    data = tmp_path / "data"
    copy_subset(industrial_root / "kolektorsdd", data / "kolektorsdd", 16, 6, 6)
    copy_subset(industrial_root / "magnetic_tile", data / "magnetic_tile", 16, 6, 3)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["datasets"] = {"two": {"root": str(data), "categories": ["kolektorsdd", "magnetic_tile"]}}
    params.update(dataset="two", method="padim", image_size=64, manifests_dir=str(tmp_path / "manifests"))
    params["methods"]["padim"] = {"d": 40}
    params["decision"]["false_alarm_rate"] = 0.34  # 16 train images hold out 3: enough at ⌈1/0.34⌉ = 3
    params["pipeline"].update(
        retries=0,
        concurrency=2,
        runs_dir=str(tmp_path / "runs"),
        metrics_file=str(tmp_path / "metrics.json"),
        plots_dir=str(tmp_path / "plots"),
    )
    params["mlflow"].update(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "art")
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = service_env(tmp_path)
    subprocess.run(["adaptad", "prepare", "--params", str(path)], env=env, check=True, capture_output=True)
    # after verification one test image of magnetic_tile disappears: that category must fail at evaluation
    victim = next((data / "magnetic_tile" / "test" / "good").iterdir())
    victim.unlink()
    # a rule the held-out slice is too small for is refused before any work, naming what it needs
    cmd = ["adaptad", "pipeline", "--params", str(path)]
    small = subprocess.run(
        [*cmd, "-S", "decision.false_alarm_rate=0.05"], env=env, capture_output=True, text=True
    )
    assert small.returncode == 2 and "needs 20 held-out normal images" in small.stderr, small.stderr[-2000:]
    assert "holds out 3 of its 16 train images" in small.stderr and not (tmp_path / "runs").exists()
    out = subprocess.run(
        ["adaptad", "pipeline", "--params", str(path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 1, out.stderr[-3000:]
    (last,) = [line for line in out.stderr.splitlines() if line.startswith("adaptad pipeline: failed:")]
    assert "categories failed: magnetic_tile" in last and victim.name in last, last
    assert "kolektorsdd" not in last.split("categories failed:")[1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"kolektorsdd"}  # the finished category's results are kept
    # the operating point: thresholds from held-out normal images, the test figures at them
    at = metrics["categories"]["kolektorsdd"]
    assert at["image_threshold"] > 0 and 0 <= at["image_fpr"] <= 1 and 0 <= at["image_recall"] <= 1, at
    assert metrics["mean"]["image_f1"] == at["image_f1"] and "image_threshold" not in metrics["mean"]
    (decided,) = (tmp_path / "runs").glob("*/decision-*/decision.json")
    assert json.loads(decided.read_text())["metrics"]["image_fpr"] == at["image_fpr"]
    assert json.loads(decided.read_text())["calibration"]["held_out_normal"] == 3
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='adaptad-two-kolektorsdd'")
    logged = client.get_run(version.run_id).data
    assert logged.metrics["image_threshold"] == at["image_threshold"]
    assert logged.params["decision.rule"] == "normal_quantile"
    assert client.search_model_versions("name='adaptad-two-magnetic_tile'") == []
    finished = [p for p in (tmp_path / "runs").iterdir() if (p / "evaluation" / "metrics.json").is_file()]
    assert len(finished) == 1 and not [
        p for p in (tmp_path / "runs").rglob(".evaluation*")
    ]  # no half-written run
