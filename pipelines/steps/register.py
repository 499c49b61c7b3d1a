"""Register: every trained model becomes a version; the promotion gate decides its alias.

``champion`` moves only when the candidate clears an absolute floor, beats the current champion by a
margin on the candidate's own evaluation set, and regresses on no slice beyond a tolerance. Otherwise the
version becomes ``challenger`` and the reason says why. The decision and its numbers go on the run.

Every move of ``champion`` (a training's gate, ``promote``, ``rollback``) is a compare-and-set: MLflow has
none, so the moves of one model take turns under a ``PromotionLock`` and each re-reads the champion, and
gates against it, after taking the lock. A version is created ``pending`` and the marker goes once its alias
is set; a registration killed in between leaves a pending version with no alias, which the next move, under
the same lock and so surely alone, deletes.

The moves (``promote``, ``rollback``, ``clean_up_orphans``) take either MLflow's client or ``RestRegistry``
(``registry_api``: the same calls over MLflow's REST API, without ``import mlflow``'s seconds), so this module
imports MLflow only where the gate scores models.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.steps.registry_api import Registry, registry_errors

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from driftloop.settings import Settings
    from pipelines.steps.evaluate import Metrics

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREVIOUS = "driftloop.previous_champion"  # on a champion: the one it replaced (what rollback puts back)
TAG_REGISTRATION = "driftloop.registration"  # "pending" from a version's creation until its alias is set
TAG_PROMOTION = "driftloop.promotion"  # JSON: who moved champion to this version by hand, when, why
TAG_ROLLED_BACK = "driftloop.rolled_back"
TAG_ORPHAN = "driftloop.gate.orphaned_version"  # on a run whose killed registration left a version behind
LOCK_WAIT_S = 600.0  # a promotion holds the lock for seconds; waiting longer means something is stuck


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
    orphans_removed: list[str] = field(default_factory=list)  # versions killed registrations had left


@dataclass(frozen=True)
class Move:
    """``champion`` moved by hand (``promote``, ``rollback``)."""

    model: str
    was: str | None
    now: str
    reason: str


class PromotionLock:
    """One move of a model's ``champion`` at a time, for every process that shares the lock's store.

    Local profile: an exclusive ``flock`` on a file in the state dir. Cluster profile: a PostgreSQL session
    advisory lock (the state dir there may be shared storage, where file locks are not to be trusted). The
    operating system or the server drops either when its holder dies, so a killed promotion blocks nothing.
    Writers outside driftloop (the MLflow UI) do not take it; a move reads its alias back to notice them.
    """

    def __init__(self, key: str, lock_dir: Path | None = None, postgres_dsn: str | None = None,
                 wait_s: float = LOCK_WAIT_S) -> None:
        digest = hashlib.sha256(key.encode()).digest()
        self._id = int.from_bytes(digest[:8], "big", signed=True)  # PostgreSQL's advisory lock ids are bigints
        self._path = lock_dir / f"promotion-{digest[:6].hex()}.lock" if lock_dir else None
        self._dsn = postgres_dsn
        self._wait_s = wait_s
        self._held: Any = None

    @classmethod
    def for_settings(cls, settings: Settings, wait_s: float = LOCK_WAIT_S) -> PromotionLock:
        key = f"{settings.tracking_uri}#{settings.model_name}"
        if settings.profile == "cluster":
            return cls(key, postgres_dsn=settings.postgres_dsn, wait_s=wait_s)
        return cls(key, lock_dir=settings.state / "locks", wait_s=wait_s)

    def __enter__(self) -> PromotionLock:
        self._held = self._postgres() if self._dsn else self._file()
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held = self._held, None
        held.close()  # closing the session or the file lets the lock go

    def check(self) -> None:
        """Right before a move: fail unless the lock is still held (its PostgreSQL session still alive)."""
        if self._held is None:
            raise RegistryError("the promotion lock is not held")
        if self._dsn:
            import psycopg

            try:
                self._held.execute("SELECT 1")
            except psycopg.Error as err:
                raise RegistryError(f"lost the promotion lock's PostgreSQL session ({err}); retry") from err

    def _busy(self) -> RegistryError:
        return RegistryError(f"another promotion of the same model has held its lock for {self._wait_s:.0f} s; "
                             "retry once it has finished")

    def _postgres(self) -> Any:
        import psycopg

        try:
            db = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            raise RegistryError(f"cannot reach PostgreSQL for the promotion lock ({err}); check "
                                "DRIFTLOOP_POSTGRES_DSN") from err
        try:
            db.execute(f"SET lock_timeout = '{int(self._wait_s * 1000)}ms'")  # bounds the wait below
            db.execute("SELECT pg_advisory_lock(%s)", (self._id,))
        except psycopg.errors.LockNotAvailable as err:
            db.close()
            raise self._busy() from err
        except BaseException:
            db.close()
            raise
        return db

    def _file(self) -> Any:
        assert self._path is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._path.open("a")
        deadline = time.monotonic() + self._wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise self._busy() from None
                time.sleep(0.05)


def decide(candidate: Metrics, champion: Metrics | None, policy: GatePolicy) -> tuple[bool, list[str], str]:
    """The gate as a pure function: (promote?, failed checks, reason)."""
    from pipelines.steps.evaluate import auc_standard_error  # numpy, pandas, MLflow: not for rollback's sake

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


def current_champion(client: Registry, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except registry_errors() as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _metrics_of(run_id: str) -> Metrics:
    import mlflow

    from pipelines.steps.evaluate import Metrics

    data = mlflow.artifacts.load_dict(f"{mlflow.get_run(run_id).info.artifact_uri}/evaluation.json")
    return Metrics(**data)



def _scored(model_name: str, version: str | None, rows: Callable[[], pd.DataFrame]) -> Metrics | None:
    """The champion re-scored on the candidate's holdout (read only when there is a champion)."""
    from pipelines.steps.evaluate import evaluate_model

    return None if version is None else evaluate_model(f"models:/{model_name}/{version}", rows())


def clean_up_orphans(client: Registry, model_name: str) -> list[str]:
    """Finish or remove what killed registrations left behind; only under the promotion lock.

    Under the lock no registration is in flight, so a pending version's registrant is gone. If it had set
    the version's alias, only the marker's removal was lost: the marker goes. If not, the version never
    served and never will: it is deleted (its run says so) and returned.
    """
    pending = client.search_model_versions(f"name = '{model_name}' AND tags.`{TAG_REGISTRATION}` = 'pending'")
    removed = []
    for found in pending:
        version = client.get_model_version(model_name, found.version)  # a search's results carry no aliases
        if version.aliases:
            client.delete_model_version_tag(model_name, version.version, TAG_REGISTRATION)
            continue
        client.delete_model_version(model_name, version.version)
        removed.append(str(version.version))
        if version.run_id:
            with contextlib.suppress(*registry_errors()):  # the run itself is gone: nothing left to annotate
                client.set_tag(version.run_id, TAG_ORPHAN, f"v{version.version} deleted: its registration was "
                               "killed before its alias was set")
    return removed


def _move(client: Registry, model_name: str, alias: str, version: str, lock: PromotionLock) -> None:
    """Point ``alias`` at ``version`` and read it back: a writer outside the lock would show up here."""
    lock.check()
    client.set_registered_model_alias(model_name, alias, version)
    now = str(client.get_model_version_by_alias(model_name, alias).version)
    if now != str(version):
        raise RegistryError(f"{model_name}@{alias} was moved to v{now} by someone outside driftloop while "
                            f"v{version} was being set; check who, then retry")


def register(client: MlflowClient, run_id: str, model_name: str, policy: GatePolicy = GatePolicy(), *,
             lock: PromotionLock) -> Decision:
    """Gate the run's model against the champion, register it, and set its alias.

    Scoring the champion (the slow part) happens first, outside the lock. Under the lock the champion is
    read again, and if another promotion moved it meanwhile the gate runs again against the new one: the
    alias only ever moves from the champion the candidate was judged against. If setting the alias fails,
    the new version is deleted again; if the process dies first, the next registration deletes it.
    """
    import mlflow

    from pipelines.steps.evaluate import holdout
    from pipelines.steps.train import TAG_FEATURE_SERVICE, TAG_FINGERPRINT, TAG_MODEL_URI  # XGBoost: not at import

    run = client.get_run(run_id)
    candidate = _metrics_of(run_id)
    rows = functools.cache(lambda: holdout(run_id))
    judged_against = current_champion(client, model_name)
    champion = _scored(model_name, judged_against, rows)
    with lock:
        orphans = clean_up_orphans(client, model_name)
        champion_version = current_champion(client, model_name)
        if champion_version != judged_against:  # another promotion came first: judge against its result
            champion = _scored(model_name, champion_version, rows)
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

        version = str(mlflow.register_model(
            run.data.tags[TAG_MODEL_URI],
            model_name,
            tags={
                "run_id": run_id,
                TAG_FEATURE_SERVICE: run.data.tags.get(TAG_FEATURE_SERVICE, ""),
                TAG_FINGERPRINT: run.data.tags.get(TAG_FINGERPRINT, ""),
                TAG_REGISTRATION: "pending",
                "gate.decision": alias,
                "gate.reason": reason[:5000],
                "eval.auc": f"{candidate.auc:.6f}",
                **({TAG_PREVIOUS: champion_version} if promoted and champion_version else {}),
            },
        ).version)
        try:
            _move(client, model_name, alias, version, lock)
        except Exception:
            client.delete_model_version(model_name, version)
            raise
        client.delete_model_version_tag(model_name, version, TAG_REGISTRATION)
    decision = Decision(
        run_id=run_id,
        promoted=promoted,
        alias=alias,
        reason=reason,
        candidate=candidate.flat(),
        champion=champion.flat() if champion else None,
        champion_version=champion_version,
        version=version,
        failed_checks=failed,
        orphans_removed=orphans,
    )
    client.set_tag(run_id, "driftloop.gate.version", version)
    mlflow_dict = json.loads(json.dumps(asdict(decision)))
    client.log_dict(run_id, mlflow_dict, "gate.json")
    return decision


def _existing(client: Registry, model_name: str, version: str) -> Any:
    """The model version, or a RegistryError naming the versions there are."""
    try:
        return client.get_model_version(model_name, version)
    except registry_errors() as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model_name}'"))
    except registry_errors():
        versions = []
    if not versions:
        raise RegistryError(f"{model_name} has no versions yet: run `driftloop train` first")
    shown = ", ".join(map(str, versions[-20:]))
    raise RegistryError(f"{model_name} has no version {version} (versions: {'…, ' if len(versions) > 20 else ''}"
                        f"{shown})")


def _record(action: str, by: str, over: str | None, why: str, forced: bool = False) -> str:
    return json.dumps({"action": action, "by": by[:200], "at": datetime.now(UTC).isoformat(timespec="seconds"),
                       "over": over, "forced": forced, "why": why[:4000]})  # within a tag's 5,000 characters


def _history(client: Registry, model_name: str, version: str) -> list[str]:
    """``version`` and the champions before it, newest first (a version champion twice ends the walk)."""
    chain = [version]
    while True:
        try:
            previous = client.get_model_version(model_name, chain[-1]).tags.get(TAG_PREVIOUS)
        except registry_errors():
            return chain
        if not previous or previous in chain:
            return chain
        chain.append(previous)


def promote(client: Registry, model_name: str, version: str, policy: GatePolicy = GatePolicy(), *,
            lock: PromotionLock, by: str, force_reason: str | None = None) -> Move:
    """Make ``version`` the champion if the gate passes it against the current one; ``force_reason`` skips
    the gate and is recorded on the version with ``by`` and the time. The gate reads the candidate's
    evaluation and re-scores the champion with MLflow (configured by ``tracking.configure``), whichever
    client ``client`` is."""
    with lock:
        clean_up_orphans(client, model_name)
        target = _existing(client, model_name, version)
        was = current_champion(client, model_name)
        if was == version:
            raise RegistryError(f"{model_name} v{version} is already the champion")
        if force_reason is None:
            from mlflow.exceptions import MlflowException

            from pipelines.steps.evaluate import holdout

            run_id = target.run_id
            no_metrics = RegistryError(f"{model_name} v{version} has no evaluation metrics (run {run_id}), so the "
                                       "gate cannot judge it; `--force --reason WHY` promotes it anyway")
            if not run_id:
                raise no_metrics
            try:
                candidate = _metrics_of(run_id)
            except (MlflowException, OSError, TypeError) as err:
                raise no_metrics from err
            try:
                champion = _scored(model_name, was, lambda: holdout(run_id))
            except (MlflowException, OSError, KeyError) as err:
                raise RegistryError(f"cannot re-score the champion on v{version}'s holdout ({err}); `--force "
                                    "--reason WHY` promotes it anyway") from err
            promoted, _, reason = decide(candidate, champion, policy)
            if not promoted:
                raise RegistryError(f"the gate refuses {model_name} v{version}: {reason}; `--force --reason WHY` "
                                    "promotes it anyway")
        else:
            reason = f"forced by {by}: {force_reason}"
        _move(client, model_name, CHAMPION, version, lock)
        if was is not None:
            client.set_model_version_tag(model_name, version, TAG_PREVIOUS, was)
        elif TAG_PREVIOUS in target.tags:
            client.delete_model_version_tag(model_name, version, TAG_PREVIOUS)
        client.set_model_version_tag(model_name, version, TAG_PROMOTION,
                                     _record("promote", by, was, force_reason or reason, force_reason is not None))
        if TAG_ROLLED_BACK in target.tags:
            client.delete_model_version_tag(model_name, version, TAG_ROLLED_BACK)
        if CHALLENGER in target.aliases:  # it is the champion now
            client.delete_registered_model_alias(model_name, CHALLENGER)
    return Move(model_name, was, version, reason)


def rollback(client: Registry, model_name: str, to: str | None = None, *, lock: PromotionLock,
             by: str = "", why: str = "") -> Move:
    """Put the previous champion back, or ``to``, with no gate: the way out when the champion misbehaves.

    Rolling back to an older champion rewinds the history (another rollback goes further back); any other
    version records the champion it replaced, so a plain rollback afterwards undoes this one.
    """
    with lock:
        clean_up_orphans(client, model_name)
        current = current_champion(client, model_name)
        if current is None:
            raise RegistryError(f"{model_name} has no champion to roll back")
        if to is None:
            to = client.get_model_version(model_name, current).tags.get(TAG_PREVIOUS)
            if not to:
                raise RegistryError(f"{model_name} v{current} was the first champion: there is nothing to roll back "
                                    "to; name a version: `driftloop rollback VERSION`")
            try:
                target = client.get_model_version(model_name, to)
            except registry_errors() as err:
                raise RegistryError(f"v{current}'s previous champion v{to} no longer exists; name a version: "
                                    "`driftloop rollback VERSION`") from err
        else:
            target = _existing(client, model_name, to)
            if to == current:
                raise RegistryError(f"{model_name} v{to} is already the champion")
        rewinds = to in _history(client, model_name, current)
        _move(client, model_name, CHAMPION, to, lock)
        client.set_model_version_tag(model_name, current, TAG_ROLLED_BACK, "true")
        if not rewinds:
            client.set_model_version_tag(model_name, to, TAG_PREVIOUS, current)
        client.set_model_version_tag(model_name, to, TAG_PROMOTION, _record("rollback", by, current, why))
        if TAG_ROLLED_BACK in target.tags:
            client.delete_model_version_tag(model_name, to, TAG_ROLLED_BACK)
    return Move(model_name, current, to, why or ("rewound to an earlier champion" if rewinds else
                                                  f"v{to} replaces v{current}; a plain rollback undoes it"))
