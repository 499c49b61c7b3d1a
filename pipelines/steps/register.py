"""Register: every trained model becomes a version; the promotion gate decides its alias.

``champion`` moves only when the candidate clears an absolute floor, beats the current champion by a
margin on the candidate's own evaluation set, and regresses on no slice beyond a tolerance. Otherwise the
version becomes ``challenger`` and the reason says why. The decision and its numbers go on the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.steps.evaluate import Metrics, auc_standard_error, evaluate_model, holdout
from pipelines.steps.train import TAG_FEATURE_SERVICE, TAG_FINGERPRINT, TAG_MODEL_URI

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREVIOUS = "driftloop.previous_champion"


class RegistryError(RuntimeError):
    """The registry is not in a state that allows the action; the message says why."""


@dataclass(frozen=True)
class GatePolicy:
    min_auc: float = 0.70  # absolute floor: a shuffled-label model scores about 0.5
    margin: float = 0.002  # the candidate must beat the champion's AUC by this much
    slice_tolerance: float = 0.03  # no slice's AUC may drop more than this below the champion's


@dataclass(frozen=True)
class Decision:
    run_id: str
    promoted: bool
    alias: str
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    version: str | None = None
    failed_checks: list[str] = field(default_factory=list)


def decide(candidate: Metrics, champion: Metrics | None, policy: GatePolicy) -> tuple[bool, list[str], str]:
    """The gate as a pure function: (promote?, failed checks, reason)."""
    failed: list[str] = []
    if not candidate.auc >= policy.min_auc:
        failed.append(f"AUC {candidate.auc:.4f} is below the floor {policy.min_auc:.4f}")
    if champion is not None:
        if not candidate.auc >= champion.auc + policy.margin:
            failed.append(
                f"AUC {candidate.auc:.4f} does not beat the champion's {champion.auc:.4f} "
                f"by the margin {policy.margin:.4f}"
            )
        for name, champ_auc in sorted(champion.slices.items()):
            cand_auc = candidate.slices.get(name)
            if cand_auc is None:
                continue
            # A small slice's AUC moves by chance: only a drop beyond both the tolerance and twice the
            # standard error of the difference (the two AUCs' errors, taken as independent) is a regression.
            counts = candidate.slice_counts.get(name) or champion.slice_counts.get(name)
            noise = 2 * math.hypot(auc_standard_error(cand_auc, *counts), auc_standard_error(champ_auc, *counts)) \
                if counts else 0.0
            allowed = max(policy.slice_tolerance, noise)
            if cand_auc < champ_auc - allowed:
                failed.append(
                    f"slice {name} regresses: AUC {cand_auc:.4f} vs the champion's {champ_auc:.4f} "
                    f"(tolerance {policy.slice_tolerance:.4f}"
                    + (f", chance at {counts[0]} positives {noise:.4f})" if noise > policy.slice_tolerance else ")")
                )
    if failed:
        return False, failed, "; ".join(failed)
    if champion is None:
        return True, [], f"no champion yet and AUC {candidate.auc:.4f} clears the floor {policy.min_auc:.4f}"
    return True, [], (
        f"AUC {candidate.auc:.4f} beats the champion's {champion.auc:.4f} by more than {policy.margin:.4f} "
        "and no slice regresses"
    )


def current_champion(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _metrics_of(run_id: str) -> Metrics:
    data = mlflow.artifacts.load_dict(f"{mlflow.get_run(run_id).info.artifact_uri}/evaluation.json")
    return Metrics(**data)


def register(client: MlflowClient, run_id: str, model_name: str, policy: GatePolicy = GatePolicy()) -> Decision:
    """Gate the run's model against the champion, register it, and set its alias.

    Everything that can fail slowly (loading and scoring the champion) happens before anything is
    written to the registry; if setting the alias fails, the new version is deleted again.
    """
    run = client.get_run(run_id)
    candidate = _metrics_of(run_id)
    champion_version = current_champion(client, model_name)
    champion = None
    if champion_version is not None:
        champion = evaluate_model(f"models:/{model_name}/{champion_version}", holdout(run_id))
    promoted, failed, reason = decide(candidate, champion, policy)
    alias = CHAMPION if promoted else CHALLENGER

    gate = {"gate_promoted": float(promoted), "gate_candidate_auc": candidate.auc,
            "gate_min_auc": policy.min_auc, "gate_margin": policy.margin,
            "gate_slice_tolerance": policy.slice_tolerance}
    if champion is not None:
        gate["gate_champion_auc"] = champion.auc
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in gate.items()
                                      if math.isfinite(v)])
    client.set_tag(run_id, "driftloop.gate.decision", alias)
    client.set_tag(run_id, "driftloop.gate.reason", reason[:5000])

    version = mlflow.register_model(
        run.data.tags[TAG_MODEL_URI],
        model_name,
        tags={
            "run_id": run_id,
            TAG_FEATURE_SERVICE: run.data.tags.get(TAG_FEATURE_SERVICE, ""),
            TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, ""),
            "gate.decision": alias,
            "gate.reason": reason[:5000],
            "eval.auc": f"{candidate.auc:.6f}",
            **({TAG_PREVIOUS: champion_version} if promoted and champion_version else {}),
        },
    ).version
    try:
        client.set_registered_model_alias(model_name, alias, version)
    except Exception:
        client.delete_model_version(model_name, version)
        raise
    decision = Decision(
        run_id=run_id,
        promoted=promoted,
        alias=alias,
        reason=reason,
        candidate=candidate.flat(),
        champion=champion.flat() if champion else None,
        champion_version=champion_version,
        version=str(version),
        failed_checks=failed,
    )
    client.set_tag(run_id, "driftloop.gate.version", str(version))
    mlflow_dict = json.loads(json.dumps(asdict(decision)))
    client.log_dict(run_id, mlflow_dict, "gate.json")
    return decision


def rollback(client: MlflowClient, model_name: str) -> tuple[str, str]:
    """Put the previous champion back; return (from_version, to_version)."""
    current = current_champion(client, model_name)
    if current is None:
        raise RegistryError(f"{model_name} has no champion to roll back")
    previous = client.get_model_version(model_name, current).tags.get(TAG_PREVIOUS)
    if not previous:
        raise RegistryError(f"{model_name} v{current} was the first champion: there is nothing to roll back to")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_model_version_tag(model_name, current, "driftloop.rolled_back", "true")
    return current, previous
