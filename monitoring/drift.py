"""The drift check engine: a reference profile built once, then vectorised per-column tests and data quality.

``build_profile`` summarises the training reference once (sorted values or equal-weight quantiles per
numerical column, category counts per categorical one, null rate, range, vocabulary); the profile is JSON
so it can be logged next to the model and reloaded in milliseconds. ``check_drift`` compares a window of
traffic with it. The tests are Evidently's own formulas with Evidently's rule (drift when score >=
threshold), chosen explicitly per kind by ``DriftPolicy``, never by sample size, so a verdict here agrees
with an Evidently report configured the same way; ``evidently_drift`` runs that report for comparison.
Column kinds are inferred as Evidently infers them (an integer column with few distinct values is
categorical), unless the policy names a column's kind.

One client must not be able to fake drift: a single extreme row moves the normed Wasserstein distance of
every numerical column by its size over the window's length. So numerical tests see both samples clipped
to the reference's [q, 1-q] quantiles (``DriftPolicy.clip_quantile``; 0 gives Evidently's exact formula)
and a row's pull on a score is bounded by the reference's own spread; the extreme and impossible values
themselves are counted in data quality.

Drift tests drop nulls and non-finite values (as Evidently does), so a rising null rate, out-of-range,
extreme and impossible values and unseen categories are reported separately, in each column's
data-quality section.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftloop.contracts import BY_NAME, ENTITY_KEYS, LABEL, LABEL_TIMESTAMP, MODEL_FEATURES, TIMESTAMP, TRANSACTION_ID

if TYPE_CHECKING:
    from driftloop.settings import Settings

NUMERICAL = "numerical"
CATEGORICAL = "categorical"
KINDS = (NUMERICAL, CATEGORICAL)
NUM_METHODS = ("wasserstein", "psi", "jensenshannon")
CAT_METHODS = ("jensenshannon", "psi")

DRIFT = "drift"
NO_DRIFT = "no_drift"
INSUFFICIENT_DATA = "insufficient_data"

# Per-column status of the drift test.
OK = "ok"
CONSTANT_REFERENCE = "constant_reference"  # tested, but any change is drift (Evidently's std floor)
NO_REFERENCE_VALUES = "no_reference_values"  # the reference column is all null: nothing to compare with
NO_CURRENT_VALUES = "no_current_values"  # the window's column is all null: see its null rate

PREDICTION_COLUMNS = ("prediction", "score")  # the reference sample says "prediction", the inference log "score"
NON_FEATURES = frozenset({TIMESTAMP, LABEL, LABEL_TIMESTAMP, TRANSACTION_ID, *ENTITY_KEYS, *PREDICTION_COLUMNS,
                          "request_id", "ts", "model_name", "model_version", "entity_found"})
PROFILE_FORMAT = 1
_STD_FLOOR = 0.001  # Evidently's floor for the reference std in the normed Wasserstein distance
_FEW_LEVELS = 20  # Evidently bins a numerical column by its values, not a histogram, up to this many levels
INTEGER_LEVELS = 10  # Evidently's INTEGER_CARDINALITY_LIMIT: an integer column with this few values is categorical


@dataclass(frozen=True)
class DriftPolicy:
    """Which test each kind of column gets, the thresholds, and when a window is too small to judge.

    One policy serves the monitor and ``driftloop drift compare``: ``from_settings`` builds it from the
    settings (``DRIFTLOOP_DRIFT_*``), whose defaults are these."""

    num_method: str = "wasserstein"  # Wasserstein distance normed by the reference std
    num_threshold: float = 0.1
    cat_method: str = "jensenshannon"  # Jensen-Shannon distance (natural log)
    cat_threshold: float = 0.1
    # Dataset drift when drifted columns / tested columns >= this. With ten features one drifting column is
    # noise (online values are the newest snapshots, training saw every day's); three or four are a changed world.
    drift_share: float = 0.3
    min_rows: int = 200  # below this many rows (or non-null values in a column) there is no verdict
    # Numerical tests clip both samples to the reference's [q, 1-q] quantiles: a row moves a normed
    # Wasserstein score by at most (q_hi - q_lo) / std / rows, so a handful of rows cannot fake drift.
    # 0: Evidently's exact formula (a single row of 1e9 drifts every column).
    clip_quantile: float = 0.005
    null_rate_rise: float = 0.05  # quality issue when the null rate rises by more than this over the reference
    out_of_range_share: float = 0.01  # quality issue above this share of values outside the reference range
    unseen_share: float = 0.0  # quality issue above this share of categories the reference never had
    # A value beyond the reference's [min, max] by more than this many range widths is extreme.
    extreme_margin: float = 1.0
    implausible_share: float = 0.0  # quality issue above this share of extreme, impossible or non-finite values
    kinds: tuple[tuple[str, str], ...] = ()  # (column, kind) pairs that override the inferred kind

    def __post_init__(self) -> None:
        kinds = self.kinds.items() if isinstance(self.kinds, Mapping) else self.kinds
        object.__setattr__(self, "kinds", tuple(sorted((str(c), str(k)) for c, k in kinds)))
        bad = {c: k for c, k in self.kinds if k not in KINDS}
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; use {' or '.join(KINDS)}")
        if not 0 <= self.clip_quantile < 0.5:
            raise ValueError("clip_quantile must be in [0, 0.5)")
        if self.extreme_margin < 0:
            raise ValueError("extreme_margin must be >= 0")
        if self.num_method not in NUM_METHODS:
            raise ValueError(f"num_method must be one of {', '.join(NUM_METHODS)}, not {self.num_method!r}")
        if self.cat_method not in CAT_METHODS:
            raise ValueError(f"cat_method must be one of {', '.join(CAT_METHODS)}, not {self.cat_method!r}")
        if not (self.num_threshold > 0 and self.cat_threshold > 0):
            raise ValueError("thresholds must be > 0")
        if not 0 < self.drift_share <= 1:
            raise ValueError("drift_share must be in (0, 1]")
        if self.min_rows < 1:
            raise ValueError("min_rows must be >= 1")

    def method(self, kind: str) -> tuple[str, float]:
        return (self.num_method, self.num_threshold) if kind == NUMERICAL else (self.cat_method, self.cat_threshold)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DriftPolicy:
        """The policy the settings give (``DRIFTLOOP_DRIFT_*``); ``overrides`` that are not None win (CLI options).
        A ``kinds`` override adds to the settings' kinds."""
        values: dict[str, Any] = {
            "num_method": settings.drift_num_method, "num_threshold": settings.drift_num_threshold,
            "cat_method": settings.drift_cat_method, "cat_threshold": settings.drift_cat_threshold,
            "drift_share": settings.drift_share, "min_rows": settings.drift_min_rows,
            "clip_quantile": settings.drift_clip_quantile, "extreme_margin": settings.drift_extreme_margin,
        }
        kinds = {**settings.drift_kinds, **dict(overrides.pop("kinds", None) or {})}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values, kinds=tuple(kinds.items()))


def parse_kinds(items: Sequence[str]) -> dict[str, str]:
    """``["col=categorical", ...]`` -> {col: kind}; raises ``ValueError`` naming a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        column, sep, kind = item.partition("=")
        if not sep or not column.strip() or kind.strip() not in KINDS:
            raise ValueError(f"{item!r}: give COLUMN={' or COLUMN='.join(KINDS)}")
        out[column.strip()] = kind.strip()
    return out


# --- the reference profile -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NumericalProfile:
    """One numerical column of the reference. ``sample`` is sorted: every finite value, or ``max_sample``
    equal-weight quantiles when there are more (an approximation whose Wasserstein error is tiny)."""

    name: str
    rows: int
    count: int  # finite values
    null_rate: float
    std: float  # of all finite values, ddof=0 (as Evidently)
    low: float  # min and max: the range for out-of-range checks (nan when no values)
    high: float
    n_unique: int
    integer: bool  # integer dtype: numpy's histogram then uses bins at least 1 wide
    sample: np.ndarray
    exact: bool  # sample holds every value
    levels: np.ndarray  # the distinct values and their counts, kept when n_unique <= 20 (binned tests)
    level_counts: np.ndarray
    kind: str = NUMERICAL


@dataclass(frozen=True, eq=False)
class CategoricalProfile:
    """One categorical column of the reference: each category's count (as a string) and the null rate."""

    name: str
    rows: int
    count: int  # non-null values
    null_rate: float
    categories: tuple[str, ...]
    counts: np.ndarray  # int64, aligned with categories; contract categories never seen count 0
    kind: str = CATEGORICAL


ColumnProfile = NumericalProfile | CategoricalProfile


@dataclass(frozen=True, eq=False)
class ReferenceProfile:
    """Everything ``check_drift`` needs from the reference, built once (``build_profile``)."""

    rows: int
    columns: dict[str, ColumnProfile]
    prediction: NumericalProfile | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "rows": self.rows,
                "columns": [_profile_to_dict(p) for p in self.columns.values()],
                "prediction": _profile_to_dict(self.prediction) if self.prediction else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Raises ``ValueError`` when ``data`` is not a profile of this format."""
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a drift profile (format {PROFILE_FORMAT})")
        try:
            columns = [_profile_from_dict(c) for c in data["columns"]]
            prediction = _profile_from_dict(data["prediction"]) if data.get("prediction") else None
            if prediction is not None and not isinstance(prediction, NumericalProfile):
                raise ValueError("the prediction must be numerical")
            return cls(rows=int(data["rows"]), columns={c.name: c for c in columns}, prediction=prediction)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a drift profile: {error}") from error

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a drift profile: {error}") from error
        return cls.from_dict(data)


def _profile_to_dict(p: ColumnProfile) -> dict[str, Any]:
    return _jsonable({f.name: getattr(p, f.name) for f in fields(p)})


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)  # JSON has no NaN: a column without values has null


def _profile_from_dict(d: Mapping[str, Any]) -> ColumnProfile:
    if d["kind"] == NUMERICAL:
        return NumericalProfile(
            name=str(d["name"]), rows=int(d["rows"]), count=int(d["count"]), null_rate=_number(d["null_rate"]),
            std=_number(d["std"]), low=_number(d["low"]), high=_number(d["high"]), n_unique=int(d["n_unique"]),
            integer=bool(d["integer"]), sample=np.asarray(d["sample"], dtype=np.float64), exact=bool(d["exact"]),
            levels=np.asarray(d["levels"], dtype=np.float64), level_counts=np.asarray(d["level_counts"], np.int64))
    if d["kind"] == CATEGORICAL:
        return CategoricalProfile(
            name=str(d["name"]), rows=int(d["rows"]), count=int(d["count"]), null_rate=float(d["null_rate"]),
            categories=tuple(str(c) for c in d["categories"]), counts=np.asarray(d["counts"], dtype=np.int64))
    raise ValueError(f"unknown column kind {d['kind']!r}")


def infer_kind(name: str, series: pd.Series) -> str:
    """As Evidently infers a column's kind: floats are numerical; integers are categorical when they take at
    most ``INTEGER_LEVELS`` distinct values, else numerical; anything else (text, bool) is categorical.
    A model feature's contract says which columns are categories and which hold integers (the inference
    log stores every number as a float)."""
    contract = BY_NAME.get(name)
    if contract is not None and contract.kind == "category":
        return CATEGORICAL
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return CATEGORICAL
    integer = pd.api.types.is_integer_dtype(series) or (contract is not None and contract.kind == "int")
    if integer and series.nunique() <= INTEGER_LEVELS:
        return CATEGORICAL
    return NUMERICAL


def feature_columns(reference: pd.DataFrame, current: pd.DataFrame | None = None) -> list[str]:
    """Columns to test by default: the model's features both frames have (contract order); for other data,
    every shared column that is not a timestamp, id, label or prediction."""
    shared = [c for c in reference.columns if current is None or c in current.columns]
    features = [c for c in MODEL_FEATURES if c in shared]
    if features:
        return features
    return [str(c) for c in shared if str(c) not in NON_FEATURES
            and not pd.api.types.is_datetime64_any_dtype(reference[c])]


def resolve_kinds(frame: pd.DataFrame, columns: Sequence[str] | Mapping[str, str] | None,
                  overrides: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Column name -> kind. ``columns`` may give kinds explicitly; ``overrides`` (column -> kind, e.g. the
    policy's ``kinds``) win over the inference for the columns it names. Raises ``ValueError`` naming bad input."""
    forced = dict(overrides)
    if columns is None:
        columns = feature_columns(frame)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"no column(s) {', '.join(missing)} in the data")
    if isinstance(columns, Mapping):
        bad = {c: k for c, k in columns.items() if k not in KINDS}
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; use {' or '.join(KINDS)}")
        return {c: forced.get(c, k) for c, k in columns.items()}
    return {c: forced.get(c) or infer_kind(c, frame[c]) for c in columns}


def build_profile(reference: pd.DataFrame, columns: Sequence[str] | Mapping[str, str] | None = None, *,
                  max_sample: int = 10_000,
                  kinds: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> ReferenceProfile:
    """Summarise ``reference`` once. ``columns``: names (kinds inferred, ``infer_kind``) or name -> kind;
    default ``feature_columns``. ``kinds`` overrides the kind of the columns it names (``DriftPolicy.kinds``).
    A ``prediction`` or ``score`` column, if any, is profiled for prediction drift. Raises ``ValueError``
    on an empty frame or a missing column."""
    if len(reference) == 0:
        raise ValueError("the reference has no rows")
    kinds = resolve_kinds(reference, columns, kinds)
    profiles: dict[str, ColumnProfile] = {}
    for name, kind in kinds.items():
        if kind == NUMERICAL:
            profiles[name] = _numerical_profile(name, reference[name], max_sample)
        else:
            profiles[name] = _categorical_profile(name, reference[name])
    pred = next((c for c in PREDICTION_COLUMNS if c in reference.columns and c not in kinds), None)
    prediction = _numerical_profile(pred, reference[pred], max_sample) if pred else None
    return ReferenceProfile(rows=len(reference), columns=profiles, prediction=prediction)


def _as_float(series: pd.Series) -> np.ndarray:
    """Float64 values, NaN for nulls; text that is not a number becomes NaN (counted as null)."""
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _is_integer(series: pd.Series) -> bool:
    # Evidently drops nulls before binning: a nullable-int column without nulls is still integer there.
    return pd.api.types.is_integer_dtype(series)


def _numerical_profile(name: str, series: pd.Series, max_sample: int) -> NumericalProfile:
    raw = _as_float(series)
    nulls = int(np.isnan(raw).sum())
    values = np.sort(raw[np.isfinite(raw)])
    n = values.size
    if n == 0:
        empty = np.empty(0)
        return NumericalProfile(name, len(series), 0, nulls / max(len(series), 1), math.nan, math.nan, math.nan,
                                0, _is_integer(series), empty, True, empty, np.empty(0, np.int64))
    # Distinct values of a sorted array: where it changes.
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    n_unique = starts.size
    if n_unique <= _FEW_LEVELS:
        levels, level_counts = values[starts], np.diff(np.r_[starts, n]).astype(np.int64)
    else:
        levels, level_counts = np.empty(0), np.empty(0, np.int64)
    if n > max_sample:
        # Block medians: the L1-best equal-weight summary, so the Wasserstein error stays tiny.
        sample, exact = values[((2 * np.arange(max_sample) + 1) * n) // (2 * max_sample)], False
    else:
        sample, exact = values, True
    return NumericalProfile(name, len(series), n, nulls / len(series), float(np.std(values)), float(values[0]),
                            float(values[-1]), int(n_unique), _is_integer(series), sample, exact, levels,
                            level_counts)


def _category(value: Any) -> str:
    """A category's name: integral numbers without a decimal point, so an integer column read back from the
    inference log (where every number is a float) has the reference's categories."""
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _categorical_profile(name: str, series: pd.Series) -> CategoricalProfile:
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques)).astype(np.int64)
    merged: dict[str, int] = {}
    for value, count in zip(uniques, counts, strict=True):
        merged[_category(value)] = merged.get(_category(value), 0) + int(count)
    # Contract categories the sample happened to miss are known, not "unseen" (count 0 changes no score).
    for category in BY_NAME[name].categories if name in BY_NAME else ():
        merged.setdefault(category, 0)
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    nulls = int((codes < 0).sum())
    return CategoricalProfile(name, len(series), len(series) - nulls, nulls / len(series),
                              tuple(k for k, _ in ordered), np.asarray([v for _, v in ordered], dtype=np.int64))


# --- the report ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift test. ``score`` is None when there was nothing to test (see ``status``);
    ``drifted`` is never True without enough values (``policy.min_rows``)."""

    column: str
    kind: str
    method: str
    score: float | None
    threshold: float
    drifted: bool
    status: str  # ok | constant_reference | no_reference_values | no_current_values | insufficient_data
    values: int  # non-null values tested in the window


@dataclass(frozen=True)
class ColumnQuality:
    """What the drift test cannot see: null rate against the reference's, values outside the reference's
    range and implausible ones (numerical), categories it never had (categorical); ``issues`` names what
    exceeds the policy. Implausible values are non-finite, impossible (outside a model feature's contract
    range: a negative amount, hour 27) or extreme (beyond the reference's plausible range, ``plausible_low``
    to ``plausible_high``: its [min, max] widened by ``DriftPolicy.extreme_margin`` range widths)."""

    column: str
    null_rate: float
    reference_null_rate: float
    out_of_range_share: float  # of non-null values; 0 for categorical columns
    unseen_categories: tuple[str, ...]  # most frequent first, at most 20 names
    unseen_share: float  # of non-null values
    issues: tuple[str, ...]
    non_finite: int = 0  # +-inf
    impossible: int = 0  # finite, outside the contract's range
    extreme: int = 0  # finite, possible, beyond the plausible range
    plausible_low: float = math.nan
    plausible_high: float = math.nan


@dataclass(frozen=True)
class DriftReport:
    """The verdict for one window: per-column drift and quality, prediction drift, dataset verdict."""

    verdict: str  # drift | no_drift | insufficient_data
    rows: int
    reference_rows: int
    drift_share: float  # drifted / tested columns (0 when none could be tested)
    drifted_columns: tuple[str, ...]
    columns: dict[str, ColumnDrift]
    quality: dict[str, ColumnQuality]
    prediction: ColumnDrift | None
    policy: DriftPolicy = field(default_factory=DriftPolicy)
    implausible_rows: int = 0  # rows with an implausible value in any feature (see ``ColumnQuality``)

    @property
    def quality_issues(self) -> dict[str, tuple[str, ...]]:
        return {name: q.issues for name, q in self.quality.items() if q.issues}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes None)."""
        return _jsonable({
            "verdict": self.verdict, "rows": self.rows, "reference_rows": self.reference_rows,
            "drift_share": self.drift_share, "drift_share_threshold": self.policy.drift_share,
            "drifted_columns": list(self.drifted_columns), "implausible_rows": self.implausible_rows,
            "columns": {n: asdict(c) for n, c in self.columns.items()},
            "quality": {n: asdict(q) for n, q in self.quality.items()},
            "prediction": asdict(self.prediction) if self.prediction else None,
            "policy": asdict(self.policy),
        })


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


# --- the check -------------------------------------------------------------------------------------------


def check_drift(profile: ReferenceProfile, current: pd.DataFrame, policy: DriftPolicy | None = None) -> DriftReport:
    """Compare ``current`` with the reference ``profile`` under ``policy``.

    Dataset verdict: ``insufficient_data`` below ``policy.min_rows`` rows or when no column could be
    tested; else ``drift`` when drifted / tested columns >= ``policy.drift_share``. Raises ``ValueError``
    naming profiled columns that ``current`` lacks.
    """
    policy = policy or DriftPolicy()
    missing = [c for c in profile.columns if c not in current.columns]
    if missing:
        raise ValueError(f"the current data has no column(s) {', '.join(missing)}")
    rows = len(current)
    enough = rows >= policy.min_rows
    columns: dict[str, ColumnDrift] = {}
    quality: dict[str, ColumnQuality] = {}
    implausible = np.zeros(rows, dtype=bool)
    for name, ref in profile.columns.items():
        columns[name], quality[name], bad = _check_column(ref, current[name], policy, enough)
        if bad is not None:
            implausible |= bad
    prediction = None
    if profile.prediction is not None:
        pred = next((c for c in PREDICTION_COLUMNS if c in current.columns and c not in profile.columns), None)
        if pred is not None:
            prediction, _, _ = _check_column(profile.prediction, current[pred], policy, enough)
    tested = [c for c in columns.values() if c.score is not None and c.status != INSUFFICIENT_DATA]
    drifted = tuple(c.column for c in tested if c.drifted)
    share = len(drifted) / len(tested) if tested else 0.0
    verdict = DRIFT if share >= policy.drift_share else NO_DRIFT
    if not enough or not tested:
        verdict = INSUFFICIENT_DATA
    return DriftReport(verdict=verdict, rows=rows, reference_rows=profile.rows, drift_share=share,
                       drifted_columns=drifted, columns=columns, quality=quality, prediction=prediction,
                       policy=policy, implausible_rows=int(np.count_nonzero(implausible)))


def _check_column(ref: ColumnProfile, series: pd.Series, policy: DriftPolicy,
                  enough_rows: bool) -> tuple[ColumnDrift, ColumnQuality, np.ndarray | None]:
    """The column's drift test and data quality, and for a numerical column the mask of its implausible rows."""
    method, threshold = policy.method(ref.kind)
    rows = len(series)
    bad = None
    if isinstance(ref, NumericalProfile):
        raw = _as_float(series)
        nulls = int(np.isnan(raw).sum())
        finite = raw[np.isfinite(raw)]
        present = rows - nulls
        # Comparisons with NaN are False, so nulls never count as out of range; +-inf always do.
        outside = int(np.count_nonzero(raw < ref.low) + np.count_nonzero(raw > ref.high)) if ref.count else 0
        (low, high), (c_low, c_high) = _plausible(ref, policy), _contract_range(ref.name)
        # Implausible: outside both ranges' overlap, or not finite. Impossible: outside the contract's.
        lo, hi = max(low, c_low), min(high, c_high)
        bad = (raw < lo) | (raw > hi)  # finite bounds catch +-inf too
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad |= np.isinf(raw)
        non_finite = present - finite.size
        impossible = 0
        if math.isfinite(c_low) or math.isfinite(c_high):
            impossible = int(np.count_nonzero(finite < c_low) + np.count_nonzero(finite > c_high))
        extreme = int(np.count_nonzero(bad)) - non_finite - impossible
        quality = _quality(ref, rows, nulls, outside / present if present else 0.0, (), 0.0, policy,
                           (non_finite, impossible, extreme, low, high, c_low, c_high))
        values = finite.size
        score = None
        if ref.count and values:
            score = _numerical_score(ref, finite, _is_integer(series), method, policy.clip_quantile)
    else:
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        present_codes = codes[codes >= 0]
        counts = np.bincount(present_codes, minlength=len(uniques))
        values = present_codes.size
        nulls = rows - values
        ref_index = {c: i for i, c in enumerate(ref.categories)}
        cur_counts = np.zeros(len(ref.categories), dtype=np.int64)
        unseen: dict[str, int] = {}
        for value, count in zip(uniques, counts, strict=True):  # one step per distinct value, not per row
            key = _category(value)
            if key in ref_index:
                cur_counts[ref_index[key]] += count
            else:
                unseen[key] = unseen.get(key, 0) + int(count)
        unseen_total = sum(unseen.values())
        names = tuple(k for k, _ in sorted(unseen.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
        quality = _quality(ref, rows, nulls, 0.0, names, unseen_total / values if values else 0.0, policy)
        score = None
        if ref.count and values:
            score = _categorical_score(ref.counts, np.r_[cur_counts, list(unseen.values())], method)

    if not ref.count:
        status = NO_REFERENCE_VALUES
    elif not values:
        status = NO_CURRENT_VALUES
    elif not enough_rows or values < policy.min_rows:
        status = INSUFFICIENT_DATA
    elif isinstance(ref, NumericalProfile) and ref.n_unique == 1:
        status = CONSTANT_REFERENCE
    else:
        status = OK
    drifted = score is not None and status in (OK, CONSTANT_REFERENCE) and score >= threshold
    column = ColumnDrift(ref.name, ref.kind, method, score, threshold, bool(drifted), status, int(values))
    return column, quality, bad


def _plausible(ref: NumericalProfile, policy: DriftPolicy) -> tuple[float, float]:
    """The reference's [min, max] widened by ``extreme_margin`` range widths; everything without reference values."""
    if not ref.count:
        return -math.inf, math.inf
    width = (ref.high - ref.low) * policy.extreme_margin
    return ref.low - width, ref.high + width


def _contract_range(name: str) -> tuple[float, float]:
    """A numerical model feature's valid range (the data contract); unbounded for any other column."""
    contract = BY_NAME.get(name)
    if contract is None or contract.kind == "category":
        return -math.inf, math.inf
    return (-math.inf if contract.low is None else float(contract.low),
            math.inf if contract.high is None else float(contract.high))


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _quality(ref: ColumnProfile, rows: int, nulls: int, out_of_range: float, unseen: tuple[str, ...],
             unseen_share: float, policy: DriftPolicy,
             implausible: tuple[int, int, int, float, float, float, float] | None = None) -> ColumnQuality:
    null_rate = nulls / rows if rows else 0.0
    present = rows - nulls
    issues = []
    if rows and nulls == rows:
        issues.append("all null")
    elif null_rate - ref.null_rate > policy.null_rate_rise:
        issues.append(f"null rate {null_rate:.1%} (ref {ref.null_rate:.1%})")
    if out_of_range > policy.out_of_range_share:
        issues.append(f"{out_of_range:.1%} out of range")
    non_finite = impossible = extreme = 0
    low = high = math.nan
    if implausible is not None:
        non_finite, impossible, extreme, low, high, c_low, c_high = implausible
        over = policy.implausible_share * present
        if non_finite > over:
            issues.append(_plural(non_finite, "non-finite value"))
        if impossible > over:
            issues.append(f"{_plural(impossible, 'impossible value')} (outside {c_low:g}..{c_high:g})")
        if extreme > over:
            issues.append(f"{_plural(extreme, 'extreme value')} (beyond the plausible {low:.4g}..{high:.4g})")
    if unseen_share > policy.unseen_share:
        issues.append(f"{unseen_share:.1%} unseen: {', '.join(unseen[:3])}")
    if not ref.count:
        issues.append("no reference values")
    return ColumnQuality(ref.name, null_rate, ref.null_rate, out_of_range, unseen, unseen_share, tuple(issues),
                         non_finite, impossible, extreme, low, high)


def clip_range(ref: NumericalProfile, quantile: float) -> tuple[float, float] | None:
    """Where a numerical test clips both samples: the reference's [q, 1-q] quantiles, or its [min, max] when
    those meet (a column mostly of one value). None: no clipping (``quantile`` 0, or a constant reference,
    where any change is drift)."""
    if quantile <= 0 or not ref.count or ref.n_unique < 2:
        return None
    low, high = np.quantile(ref.sample, (quantile, 1.0 - quantile))
    if high <= low:
        low, high = ref.low, ref.high
    return float(low), float(high)


def _numerical_score(ref: NumericalProfile, values: np.ndarray, integer: bool, method: str,
                     clip_quantile: float = 0.0) -> float:
    """The column's score; ``values`` (finite, float64, the caller's own copy) may be clipped and sorted in place."""
    bounds = clip_range(ref, clip_quantile)
    if method == "wasserstein":
        sample = ref.sample
        if bounds is not None:  # clipping keeps a sorted sample sorted
            sample = np.clip(sample, *bounds)
            np.clip(values, *bounds, out=values)
        values.sort()
        return wasserstein_sorted(sample, values) / max(ref.std, _STD_FLOOR)
    if bounds is not None:
        # Binned tests: a far value would stretch the bins over an empty range; it goes to an edge bin instead.
        values = np.clip(values, ref.low, ref.high)
    ref_p, cur_p = _binned(ref, values, integer and ref.integer)
    return _psi(ref_p, cur_p) if method == "psi" else _jensenshannon(ref_p, cur_p)


def _categorical_score(ref_counts: np.ndarray, cur_counts: np.ndarray, method: str) -> float:
    # Current-only categories get reference count 0 (Evidently's keys are the union of both samples).
    ref = np.r_[ref_counts, np.zeros(cur_counts.size - ref_counts.size, dtype=np.int64)].astype(np.float64)
    cur = cur_counts.astype(np.float64)
    ref_p, cur_p = ref / ref.sum(), cur / cur.sum()
    return _psi(ref_p, cur_p) if method == "psi" else _jensenshannon(ref_p, cur_p)


def wasserstein_sorted(ref: np.ndarray, cur: np.ndarray) -> float:
    """First Wasserstein distance between two sorted samples, each point weighted equally within its sample:
    the integral of |F_ref - F_cur|, exactly as ``scipy.stats.wasserstein_distance``, in O(n + m) after the
    sort, by merging the two sorted arrays instead of sorting their concatenation again."""
    n, m = ref.size, cur.size
    pos = np.searchsorted(cur, ref, side="left") + np.arange(n)  # where each reference value lands in the merge
    is_ref = np.zeros(n + m, dtype=bool)
    is_ref[pos] = True
    merged = np.empty(n + m, dtype=np.float64)
    merged[pos] = ref
    merged[~is_ref] = cur
    # Ties sit side by side, so the gap after them is 0 and the CDF value there never counts.
    ref_below = np.cumsum(is_ref[:-1], dtype=np.int64)
    cur_below = np.arange(1, n + m, dtype=np.int64) - ref_below
    return float(np.abs(ref_below / n - cur_below / m) @ np.diff(merged))


def _binned(ref: NumericalProfile, values: np.ndarray, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """Evidently's ``get_binned_data`` for a numerical column: shares per Sturges bin over both samples when
    the reference has more than 20 distinct values, else shares per distinct value of either sample."""
    if ref.n_unique > _FEW_LEVELS:
        lo, hi = min(ref.low, float(values.min())), max(ref.high, float(values.max()))
        width = (hi - lo) / (np.log2(ref.count + values.size) + 1.0)
        if integer and width < 1:
            width = 1.0
        bins = int(np.ceil((hi - lo) / width))
        edges = np.linspace(lo, hi, bins + 1)
        # np.histogram's bins are [a, b) except the last, [a, b]; the reference sample is sorted.
        idx = np.searchsorted(ref.sample, edges, side="left")
        idx[-1] = np.searchsorted(ref.sample, edges[-1], side="right")
        ref_p = np.diff(idx) / ref.sample.size
        cur_p = np.histogram(values, bins=bins, range=(lo, hi))[0] / values.size
        return ref_p, cur_p
    cur_levels, cur_counts = np.unique(values, return_counts=True)
    keys = np.union1d(ref.levels, cur_levels)
    ref_c = np.zeros(keys.size)
    ref_c[np.searchsorted(keys, ref.levels)] = ref.level_counts
    cur_c = np.zeros(keys.size)
    cur_c[np.searchsorted(keys, cur_levels)] = cur_counts
    return ref_c / ref.count, cur_c / values.size


def _fill_zeros(p: np.ndarray) -> np.ndarray:
    """Evidently's PSI replaces empty bins with a tiny share so the log stays finite."""
    nonzero = p[p != 0]
    if nonzero.size == 0 or nonzero.size == p.size:
        return p
    small = nonzero.min()
    return np.where(p == 0, small / 10**6 if small <= 0.0001 else 0.0001, p)


def _psi(ref_p: np.ndarray, cur_p: np.ndarray) -> float:
    ref_p, cur_p = _fill_zeros(ref_p), _fill_zeros(cur_p)
    return float(np.sum((ref_p - cur_p) * np.log(ref_p / cur_p)))


def _jensenshannon(ref_p: np.ndarray, cur_p: np.ndarray) -> float:
    """As ``scipy.spatial.distance.jensenshannon`` (natural log): both normalised, 0 * log 0 = 0."""
    p, q = ref_p / ref_p.sum(), cur_p / cur_p.sum()
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum()
    return float(np.sqrt(max(kl_p + kl_q, 0.0) / 2.0))


# --- real Evidently, for comparison ---------------------------------------------------------------------


def evidently_drift(reference: pd.DataFrame, current: pd.DataFrame,
                    columns: Sequence[str] | Mapping[str, str] | None = None,
                    policy: DriftPolicy | None = None) -> dict[str, ColumnDrift]:
    """Run Evidently's ``DataDriftPreset`` with the policy's methods and thresholds, read each column's
    ``ValueDrift`` by name. Columns Evidently cannot test (all null in either frame) are left out.
    Slow (a full report); for tests, benchmarks and the visual report, not for the monitor's hot path."""
    from evidently import DataDefinition, Dataset, Report  # slow import, only when asked for
    from evidently.presets import DataDriftPreset

    policy = policy or DriftPolicy()
    kinds = resolve_kinds(reference, columns, policy.kinds)
    testable = {c: k for c, k in kinds.items() if c in current.columns
                and _has_values(reference[c], k) and _has_values(current[c], k)}
    if not testable:
        return {}
    num = [c for c, k in testable.items() if k == NUMERICAL]
    cat = [c for c, k in testable.items() if k == CATEGORICAL]
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)

    def dataset(frame: pd.DataFrame):
        part = frame[list(testable)].copy()
        for c in num:
            part[c] = _as_float(part[c]) if not pd.api.types.is_numeric_dtype(part[c]) else part[c]
        return Dataset.from_pandas(part, data_definition=definition)

    preset = DataDriftPreset(columns=list(testable), drift_share=policy.drift_share,
                             num_method=policy.num_method, num_threshold=policy.num_threshold,
                             cat_method=policy.cat_method, cat_threshold=policy.cat_threshold)
    snapshot = Report([preset], include_tests=True).run(dataset(current), dataset(reference))
    failed: dict[str, bool] = {}
    for test in snapshot.tests_results:
        params = test.metric_config.params
        if params.get("type", "").endswith(":ValueDrift"):
            failed[params["column"]] = test.status == "FAIL"  # TestStatus is a str enum
    out: dict[str, ColumnDrift] = {}
    for result in snapshot.metric_results.values():
        location = getattr(result, "metric_value_location", None)
        params = location.metric.params if location is not None else {}
        if not params.get("type", "").endswith(":ValueDrift"):
            continue
        name, score, threshold = params["column"], float(result.value), float(params["threshold"])
        out[name] = ColumnDrift(
            column=name, kind=testable[name], method=str(params["method"]), score=score, threshold=threshold,
            drifted=failed.get(name, score >= threshold), status=OK,
            values=int(current[name].notna().sum()))
    return {c: out[c] for c in testable if c in out}


def _has_values(series: pd.Series, kind: str) -> bool:
    if kind == NUMERICAL:
        return bool(np.isfinite(_as_float(series)).any())
    return bool(series.notna().any())
