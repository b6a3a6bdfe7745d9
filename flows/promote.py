"""Challenger vs champion: the promotion gates, the registry alias move, and the Prefect ``promote`` flow.

Per category (registered model ``adaptad-<dataset>-<category>``) the version with alias ``challenger`` is
compared with the version with alias ``champion`` using the metric tags log_run wrote on both. When the
gates pass (and, with ``promote.require_approval``, a reviewer approves in Prefect) alias ``champion``
moves to the challenger version. Alias ``challenger`` stays where it is: it always marks the latest
registered candidate, so right after a promotion both aliases name the same version until the next
pipeline run registers a new challenger.

The decision is recorded on the challenger version — tags ``promotion.decision`` (promoted / refused),
``promotion.reasons``, ``promotion.compared_with``, ``promotion.at`` and a "Promotion decision" section
in its description — so a challenger is decided once: running the flow again is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.input import RunInput

from flows.params import load_params
from flows.tracking import (
    CHALLENGER,
    CHAMPION,
    METRIC_TAGS,
    check_tracking,
    registered_model_name,
    resolve_tracking_uri,
    use_tracking,
)

DECISION_TAG = "promotion.decision"
NO_CHALLENGER = "no challenger"


@dataclass
class Decision:
    """Whether the challenger passes the gates, and why (one line per gate)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)


class Approval(RunInput):
    """What a reviewer answers in the Prefect UI when the promote flow pauses."""

    approve: bool = False
    comment: str = ""


# --- the gates (pure) --------------------------------------------------------------------------------------
def _num(d: dict[str, Any] | None, key: str) -> float:
    try:
        value = float((d or {}).get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _gate(gates: Any, name: str) -> float:
    return float(gates[name] if isinstance(gates, dict) else getattr(gates, name))


def _optional_gate(gates: Any, name: str) -> float | None:
    value = gates.get(name) if isinstance(gates, dict) else getattr(gates, name, None)
    return None if value is None else float(value)


def _operating_point(challenger: dict[str, Any], gates: Any) -> tuple[bool, list[str]]:
    """The gates on the challenger's figures at its own thresholds (``max_image_fpr``, ``min_image_recall``);
    a challenger without a decision fails a gate that is set."""
    ok, reasons = True, []
    for key, label, gate, worse in (
        ("image_fpr", "false-alarm rate", "max_image_fpr", lambda v, g: v > g + 1e-12),
        ("image_recall", "recall", "min_image_recall", lambda v, g: v < g - 1e-12),
    ):
        limit = _optional_gate(gates, gate)
        if limit is None:
            continue
        value = _num(challenger, key)
        if math.isnan(value):
            ok = False
            reasons.append(f"{label} at the threshold unknown (no decision) — gate {gate} {limit:.4f}")
        elif worse(value, limit):
            ok = False
            reasons.append(f"{label} at the threshold {value:.4f} fails gate {gate} {limit:.4f}")
        else:
            reasons.append(f"{label} at the threshold {value:.4f} passes gate {gate} {limit:.4f}")
    return ok, reasons


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, gates: Any) -> Decision:
    """Apply the promotion gates (params.promote.gates, or a dict of the same keys).

    ``challenger`` / ``champion`` map metric names (image_auroc, pixel_auroc, aupro, and the figures at
    the challenger's own thresholds: image_fpr, image_recall, ...) to values and may
    carry ``data_version``: a champion evaluated on another data version is not comparable — it is then
    ignored (as if there were none) and the reasons say so. Pixel gates are skipped when either value is
    NaN (data without masks).
    """
    reasons: list[str] = []
    ok = True
    image = _num(challenger, "image_auroc")
    floor = _gate(gates, "min_image_auroc")
    if math.isnan(image):
        ok = False
        reasons.append("challenger has no image AUROC")
    elif image < floor:
        ok = False
        reasons.append(f"image AUROC {image:.4f} < minimum {floor:.4f}")
    else:
        reasons.append(f"image AUROC {image:.4f} ≥ minimum {floor:.4f}")
    point_ok, point_reasons = _operating_point(challenger, gates)
    ok, reasons = ok and point_ok, reasons + point_reasons

    if champion is not None:
        mine, theirs = challenger.get("data_version"), champion.get("data_version")
        if mine is not None and theirs is not None and str(mine) != str(theirs):
            reasons.append(
                f"champion was evaluated on data version {theirs}, challenger on {mine}: not comparable, "
                "treated as no champion"
            )
            champion = None
        elif math.isnan(_num(champion, "image_auroc")):
            reasons.append("champion has no image AUROC: not comparable, treated as no champion")
            champion = None
    if champion is None:
        reasons.append("no comparable champion")
        return Decision(ok, reasons)

    gain = image - _num(champion, "image_auroc")
    need = _gate(gates, "min_improvement")
    if math.isnan(gain) or gain < need - 1e-12:
        ok = False
        reasons.append(f"image AUROC change {gain:+.4f} vs champion < required {need:+.4f}")
    else:
        reasons.append(f"image AUROC change {gain:+.4f} vs champion ≥ required {need:+.4f}")
    for key, label, gate in (
        ("pixel_auroc", "pixel AUROC", "max_pixel_auroc_drop"),
        ("aupro", "AUPRO", "max_aupro_drop"),
    ):
        mine_v, theirs_v = _num(challenger, key), _num(champion, key)
        if math.isnan(mine_v) or math.isnan(theirs_v):
            reasons.append(f"{label} not compared (not available for both)")
            continue
        drop, limit = theirs_v - mine_v, _gate(gates, gate)
        if drop > limit + 1e-12:
            ok = False
            reasons.append(f"{label} drops by {drop:.4f} > allowed {limit:.4f}")
        else:
            reasons.append(f"{label} change {-drop:+.4f} within allowed drop {limit:.4f}")
    return Decision(ok, reasons)


# --- the registry ------------------------------------------------------------------------------------------
def _by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_metrics(version) -> dict[str, Any]:
    """The metric tags (and data version) log_run wrote on a model version."""
    tags = version.tags or {}
    out: dict[str, Any] = {k: _num(tags, k) for k in METRIC_TAGS}
    if "data_version" in tags:
        out["data_version"] = tags["data_version"]
    return out


def _approval(model_name: str, version: str, decision: Decision, timeout: int) -> tuple[bool, str]:
    """Pause the running flow for a reviewer's :class:`Approval`; (approved, reason)."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    if FlowRunContext.get() is None:
        raise RuntimeError("promote.require_approval needs the Prefect promote flow (no flow run here)")
    logger = get_run_logger()
    logger.info(
        "%s version %s passes the gates (%s); waiting up to %ss for a reviewer's approval",
        model_name,
        version,
        "; ".join(decision.reasons),
        timeout,
    )
    try:
        answer = pause_flow_run(
            wait_for_input=Approval, timeout=timeout, poll_interval=max(1, min(10, timeout // 20))
        )
    except FlowPauseTimeout:
        return False, f"no reviewer approval within {timeout}s"
    comment = f" ({answer.comment})" if answer.comment else ""
    if answer.approve:
        return True, f"approved by a reviewer{comment}"
    return False, f"declined by a reviewer{comment}"


def _summary(name: str, challenger, champion_before, champion_after, decision: str, reasons, changed: bool):
    return {
        "model_name": name,
        "decision": decision,
        "promoted": decision == "promoted",
        "changed": changed,
        "challenger_version": None if challenger is None else str(challenger.version),
        "champion_before": None if champion_before is None else str(champion_before.version),
        "champion_version": None if champion_after is None else str(champion_after),
        "challenger_metrics": {} if challenger is None else version_metrics(challenger),
        "champion_metrics": {} if champion_before is None else version_metrics(champion_before),
        "reasons": list(reasons),
    }


def promote_category(
    client: MlflowClient,
    model_name: str,
    gates: Any,
    require_approval: bool = False,
    approval_timeout: int = 3600,
) -> dict[str, Any]:
    """Decide on the ``challenger`` of ``model_name`` and move ``champion`` when it passes.

    Returns a summary: decision ("promoted", "refused", or "no challenger"), promoted, changed (false
    when the challenger was already decided — a no-op), versions, both metric sets and the reasons.
    """
    challenger = _by_alias(client, model_name, CHALLENGER)
    champion = _by_alias(client, model_name, CHAMPION)
    if challenger is None:
        return _summary(model_name, None, champion, champion and champion.version, NO_CHALLENGER, [], False)
    tags = challenger.tags or {}
    if champion is not None and str(champion.version) == str(challenger.version):
        reasons = tags.get("promotion.reasons", "challenger is the champion already").split("; ")
        return _summary(model_name, challenger, champion, champion.version, "promoted", reasons, False)
    if DECISION_TAG in tags:
        reasons = tags.get("promotion.reasons", "").split("; ")
        return _summary(
            model_name,
            challenger,
            champion,
            champion and champion.version,
            tags[DECISION_TAG],
            reasons,
            False,
        )

    decision = decide(
        version_metrics(challenger), None if champion is None else version_metrics(champion), gates
    )
    reasons = list(decision.reasons)
    promote = decision.promote
    if promote and require_approval:
        promote, why = _approval(model_name, str(challenger.version), decision, approval_timeout)
        reasons.append(why)
    if promote:
        client.set_registered_model_alias(model_name, CHAMPION, str(challenger.version))
    verdict = "promoted" if promote else "refused"
    compared = f"version {champion.version} (champion)" if champion is not None else "none"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in (
        ("promotion.reasons", "; ".join(reasons)),
        ("promotion.compared_with", compared),
        ("promotion.at", now),
        (DECISION_TAG, verdict),  # last: its presence marks the challenger as decided
    ):
        client.set_model_version_tag(model_name, str(challenger.version), key, value)
    section = (
        f"\n\n## Promotion decision\n\n**{verdict}** at {now}, compared with {compared}.\n\n"
        + "\n".join(f"- {r}" for r in reasons)
        + "\n"
    )
    client.update_model_version(
        model_name, str(challenger.version), description=(challenger.description or "") + section
    )
    after = challenger.version if promote else (champion.version if champion is not None else None)
    return _summary(model_name, challenger, champion, after, verdict, reasons, True)


# --- outputs -----------------------------------------------------------------------------------------------
def _metrics_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """Numbers and bools only (DVC metrics)."""
    entry: dict[str, Any] = {
        "has_challenger": summary["decision"] != NO_CHALLENGER,
        "promoted": bool(summary["promoted"]),
        "changed": bool(summary["changed"]),
    }
    for key in ("challenger_version", "champion_version"):
        if summary[key] is not None:
            entry[key] = int(summary[key])
    for prefix, metrics in (
        ("challenger", summary["challenger_metrics"]),
        ("champion", summary["champion_metrics"]),
    ):
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            value = metrics.get(key)
            if isinstance(value, float) and math.isfinite(value):
                entry[f"{prefix}_{key}"] = value
    return entry


def write_decisions(path: str | os.PathLike, decisions: dict[str, dict[str, Any]]) -> Path:
    """Write ``{category: {promoted, changed, versions, metrics}}`` atomically (temp file + os.replace)."""
    from components.atomic import write_text_atomic

    doc = {c: _metrics_entry(s) for c, s in decisions.items()}
    target = write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return target


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return "–" if value is None else str(value).replace("|", "\\|")


def decisions_markdown(dataset: str, decisions: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| category | decision | challenger | champion before → after | image AUROC (challenger / champion) "
        "| reasons |",
        "|---|---|---|---|---|---|",
    ]
    for category, s in decisions.items():
        decision = s["decision"] + (
            "" if s["changed"] or s["decision"] == NO_CHALLENGER else " (decided before)"
        )
        auroc = (
            f"{_cell(s['challenger_metrics'].get('image_auroc'))} / "
            f"{_cell(s['champion_metrics'].get('image_auroc'))}"
        )
        rows.append(
            f"| {category} | {decision} | {_cell(s['challenger_version'])} | "
            f"{_cell(s['champion_before'])} → {_cell(s['champion_version'])} | {auroc} | "
            f"{_cell('; '.join(s['reasons']))} |"
        )
    return f"# Promotion · {dataset}\n\n" + "\n".join(rows) + "\n"


def _artifact_key(dataset: str) -> str:
    return "promotion-" + (re.sub(r"[^a-z0-9-]+", "-", dataset.lower()).strip("-") or "dataset")


@flow(name="promote")
def promote(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decide every category's challenger of ``params.dataset``; write the decisions file and a table."""
    params = load_params(params_path, overrides)
    uri = resolve_tracking_uri(params)
    check_tracking(uri)
    use_tracking(uri)
    client = MlflowClient()
    logger = get_run_logger()
    decisions: dict[str, dict[str, Any]] = {}
    for category in params.data.categories:
        name = registered_model_name(params.dataset, category)
        summary = promote_category(
            client,
            name,
            params.promote.gates,
            require_approval=params.promote.require_approval,
            approval_timeout=params.promote.approval_timeout_seconds,
        )
        decisions[category] = summary
        logger.info(
            "%s: %s (challenger %s, champion %s)",
            category,
            summary["decision"],
            summary["challenger_version"],
            summary["champion_version"],
        )
    write_decisions(params.promote.decisions_file, decisions)
    create_markdown_artifact(
        markdown=decisions_markdown(params.dataset, decisions),
        key=_artifact_key(params.dataset),
        description=f"challenger vs champion decisions for {params.dataset}",
    )
    return decisions


def run_promote(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Entry point for the CLI / DVC stage: run the ``promote`` flow and return its decisions."""
    return promote(params_path=str(params_path), overrides=overrides)
