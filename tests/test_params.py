"""params.yaml schema: the repo's file is valid, bad values name their key, the run key is a content hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.params import (
    ParamsError,
    check_method,
    code_version,
    load_params,
    method_knobs,
    run_key,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def test_repo_params_are_valid_and_default_to_the_demo() -> None:
    p = load_params(PARAMS)
    assert p.dataset == "demo" and p.data.root == "data/demo" and p.data.categories == ["deeppcb"]
    assert p.spec().method == p.method and p.spec().params == p.methods.get(p.method, {})
    assert p.manifest_path() == Path("manifests/demo.parquet")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "resnet"}, "method: unknown method 'resnet'"),
        ({"train.num_workers": 0}, "train.num_workers: Input should be greater than or equal to 1"),
        ({"dataset": "mvtec"}, "dataset: 'mvtec' is not declared under datasets"),
        ({"methods.panda.learning_rate": 0.1}, "methods.panda.learning_rate: not a knob of panda"),
        ({"image_size": "big"}, "image_size: Input should be a valid integer"),
        ({"promote.gates.min_image_auroc": 2}, "promote.gates.min_image_auroc: Input should be less than"),
        ({"train.typo": 1}, "train.typo: Extra inputs are not permitted"),
        ({"tune.space.learning_rate": [0.1, 0.01]}, "tune.space.learning_rate: not a knob of panda"),
        ({"tune.space.lr": []}, "tune.space: lr: give a non-empty list of candidate values"),
        ({"tune.space.lr": [0.1, 0.1]}, "tune.space: 0.1 is listed twice"),
        ({"method": "patchcore", "adapted_by": "padim"}, "adapted_by: padim trains no backbone"),
        ({"adapted_by": "topology"}, "adapted_by: panda trains its own backbone"),
        ({"method": "patchcore", "adapted_by": "nope"}, "adapted_by: unknown method 'nope'"),
        ({"grid.adapted": {"patchcore": ["dn2"]}}, "grid.adapted: patchcore: dn2 trains no backbone"),
        ({"grid.adapted": {"patchcore": ["panda", "panda"]}}, "grid.adapted: 'panda' is listed twice"),
    ],
)
def test_invalid_values_name_the_key(overrides, message) -> None:
    with pytest.raises(ParamsError, match="params.yaml: " + message.replace("(", r"\(")):
        load_params(PARAMS, overrides)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(ParamsError, match=r"bad\.yaml: cannot read YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path / "list.yaml")


def test_method_knobs_follow_the_constructor_chain() -> None:
    assert {"epochs", "ewc", "ewc_lambda", "fisher", "k", "gallery", "sigma"} <= method_knobs("panda")
    assert "coreset_ratio" in method_knobs("patchcore") and "k" not in method_knobs("patchcore")


def test_knobs_read_from_source_equal_the_constructors_signatures() -> None:
    """The registry reads knobs with ast (no torch); they must be what the classes really accept."""
    import inspect

    from components.methods import METHOD_NAMES, METHODS

    assert set(METHODS) == set(METHOD_NAMES)
    for name, cls in METHODS.items():
        assert cls.name == name
        expected = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            for p in inspect.signature(init).parameters.values() if init else []:
                keyword = p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty
                if p.kind is p.KEYWORD_ONLY or keyword:
                    expected.add(p.name)
        assert method_knobs(name) == expected - {"progress"}, name


def test_stages_that_build_no_model_never_import_torch() -> None:
    """prepare and promote validate params.yaml without torch, timm or sklearn (seconds per stage)."""
    import subprocess
    import sys

    code = (
        "import sys, flows.stages, flows.promote; from flows.params import load_params; "
        f"load_params({str(PARAMS)!r}); "
        "heavy = sorted(m for m in ('torch', 'timm', 'sklearn') if m in sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_run_key_changes_with_what_matters_only() -> None:
    p = load_params(PARAMS)
    base = run_key(p, "deeppcb", "data-v1", code="c1")
    assert base == run_key(load_params(PARAMS), "deeppcb", "data-v1", code="c1")  # deterministic
    assert len(base) == 16
    assert run_key(p, "other", "data-v1", code="c1") != base
    assert run_key(p, "deeppcb", "data-v2", code="c1") != base
    assert run_key(p, "deeppcb", "data-v1", code="c2") != base
    assert run_key(load_params(PARAMS, {"methods.panda.lr": 0.5}), "deeppcb", "data-v1", code="c1") != base
    assert run_key(load_params(PARAMS, {"method": "patchcore"}), "deeppcb", "data-v1", code="c1") != base
    # where things are stored and how often a job may fail do not change the result
    same = load_params(
        PARAMS, {"train.storage": "/elsewhere", "train.max_failures": 5, "mlflow.tracking_uri": "x"}
    )
    assert run_key(same, "deeppcb", "data-v1", code="c1") == base
    # recording every epoch and a tune search change what a run holds or which model it keeps
    assert (
        run_key(load_params(PARAMS, {"train.record_epochs": False}), "deeppcb", "data-v1", code="c1") == base
    )
    recorded = load_params(PARAMS, {"train.record_epochs": True})
    tuned = load_params(PARAMS, {"tune.space.lr": [0.01, 0.001]})
    assert (
        len(
            {
                base,
                run_key(recorded, "deeppcb", "data-v1", code="c1"),
                run_key(tuned, "deeppcb", "data-v1", code="c1"),
            }
        )
        == 3
    )
    packed = load_params(PARAMS, {"tune.space.lr": [0.01, 0.001], "tune.max_concurrent_trials": 4})
    assert run_key(packed, "deeppcb", "data-v1", code="c1") == run_key(tuned, "deeppcb", "data-v1", code="c1")


def test_environment_variables_in_paths(monkeypatch) -> None:
    """``${NAME}`` takes a folder from the environment (the evidence params: the data and output folders
    of whatever machine runs them); an unset one names the key and the variable."""
    monkeypatch.setenv("ADAPTAD_TEST_DATA", "/mnt/data")
    p = load_params(
        PARAMS, {"datasets.demo.root": "${ADAPTAD_TEST_DATA}/industrial", "train.storage": "$HOME"}
    )
    assert p.datasets["demo"].root == "/mnt/data/industrial" and p.train.storage == "$HOME"  # only ${...}
    monkeypatch.delenv("ADAPTAD_TEST_DATA")
    with pytest.raises(
        ParamsError, match=r"params\.yaml: datasets\.demo\.root: \$\{ADAPTAD_TEST_DATA\}: the "
    ):
        load_params(PARAMS, {"datasets.demo.root": "${ADAPTAD_TEST_DATA}/industrial"})


def test_a_tune_space_is_every_combination_and_needs_a_signal() -> None:
    p = load_params(PARAMS, {"tune.space": {"lr": [0.01, 0.001], "epochs": [2, 4]}})
    assert p.tune.trials() == [
        {"lr": 0.01, "epochs": 2},
        {"lr": 0.01, "epochs": 4},
        {"lr": 0.001, "epochs": 2},
        {"lr": 0.001, "epochs": 4},
    ]
    assert p.with_knobs({"lr": 0.001}).spec().params["lr"] == 0.001 and p.method_params()["lr"] != 0.001
    check_method(p)  # every trial builds
    topology = load_params(PARAMS, {"method": "topology", "tune.space": {"lr": [1e-5, 1e-4]}})
    with pytest.raises(ParamsError, match=r"tune\.metric: topology keeps its last epoch"):
        check_method(topology)
    check_method(topology.model_copy(update={"tune": topology.tune.model_copy(update={"metric": "val_ce"})}))


def test_a_method_revision_enters_that_methods_run_keys_only(monkeypatch) -> None:
    """METHOD_REVISIONS retires one method's runs under a code version mapped as result-equivalent."""
    import flows.params as fp

    panda = load_params(PARAMS, {"method": "panda"})
    dn2 = load_params(PARAMS, {"method": "dn2"})
    monkeypatch.setattr(fp, "METHOD_REVISIONS", {})
    before = run_key(panda, "deeppcb", "data-v1", code="c1"), run_key(dn2, "deeppcb", "data-v1", code="c1")
    monkeypatch.setattr(fp, "METHOD_REVISIONS", {"panda": 1})
    assert run_key(panda, "deeppcb", "data-v1", code="c1") != before[0]
    assert run_key(dn2, "deeppcb", "data-v1", code="c1") == before[1]


def test_code_version_follows_the_result_code_only(tmp_path: Path) -> None:
    """Commits that touch only orchestration or docs keep the code version (finished runs stay reusable);
    a change to components/, flows/train.py or flows/evaluate.py — committed or not — changes it."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    files = {
        "components/m.py": "a = 1\n",
        "flows/train.py": "t\n",
        "flows/evaluate.py": "e\n",
        "README.md": "r\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    first = code_version(tmp_path)
    assert first.startswith("code-")

    (tmp_path / "README.md").write_text("changed\n")
    (tmp_path / "flows/grid.py").write_text("orchestration\n")
    git("add", ".")
    git("commit", "-qm", "docs and orchestration")
    assert code_version(tmp_path) == first

    (tmp_path / "components/m.py").write_text("a = 2\n")
    dirty = code_version(tmp_path)
    assert dirty.startswith(first + "+")
    git("commit", "-qam", "algorithm")
    assert code_version(tmp_path) not in (first, dirty)
    (tmp_path / "flows/evaluate.py").write_text("e2\n")
    git("commit", "-qam", "evaluation")
    assert len({code_version(tmp_path), first, dirty}) == 3

    # a proven result-equivalent change keeps the earlier version (chains resolve), uncommitted edits
    # on top of it still count, and the next change of the result code gets its own version again
    algorithm = code_version(tmp_path)
    (tmp_path / "flows/evaluate.py").write_text("e3  # same results, less memory\n")
    git("commit", "-qam", "memory fix")
    fixed = code_version(tmp_path)
    same = {fixed: algorithm, algorithm: first}
    assert code_version(tmp_path, same) == first
    (tmp_path / "components/m.py").write_text("a = 3\n")
    assert code_version(tmp_path, same).startswith(first + "+")
    git("commit", "-qam", "new algorithm")
    assert code_version(tmp_path, same) not in (first, fixed, algorithm)


def test_an_adapted_backbone_is_checked_with_its_training_job() -> None:
    """With adapted_by the adapter's knobs are built up front too, and it must train (epochs > 0)."""
    adapted = {"method": "patchcore", "adapted_by": "topology"}
    params = load_params(PARAMS, adapted)
    assert params.adapter().method == "topology" and params.adapter().adapted_by is None
    check_method(params)
    with pytest.raises(ParamsError, match=r"methods\.topology\.epochs: 0 — adapted_by needs a training job"):
        check_method(load_params(PARAMS, adapted | {"methods.topology.epochs": 0}))
    with pytest.raises(ParamsError, match=r"methods\.topology: topology lam=-1"):
        check_method(load_params(PARAMS, adapted | {"methods.topology.lam": -1}))
