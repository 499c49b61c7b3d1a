"""Request payloads to feature rows: v1 instances and v2 (Open Inference Protocol) tensors.

The policy, the same for both protocols:
- a field that is not a feature, an entity key or ``transaction_id`` is an error (400) naming it;
- a request feature that is missing is an error; one sent as ``null`` is an unknown value, scored and
  logged (the drift monitor counts nulls, out-of-range values and unseen categories: rejecting them here
  would hide them);
- the Feast features are either all in the request, or all absent with both entity keys present, in
  which case they are looked up in the online store;
- numbers must be finite JSON numbers, categories strings, entity keys non-negative integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from kserve.errors import InvalidInput

from driftloop.contracts import BY_NAME, ENTITY_KEYS, FEAST_FEATURES, MODEL_FEATURES, REQUEST_FEATURES, TRANSACTION_ID

ALLOWED = frozenset((*MODEL_FEATURES, *ENTITY_KEYS, TRANSACTION_ID))
REQUIRED = tuple(c.name for c in REQUEST_FEATURES if c.max_null_rate == 0.0)
FEAST_NAMES = tuple(c.name for c in FEAST_FEATURES)
_CATEGORY_INDEX = {c.name: {v: float(i) for i, v in enumerate(c.categories)} for c in BY_NAME.values()
                   if c.kind == "category"}


@dataclass
class Rows:
    """A parsed request: raw values per feature (for the log) and which rows need a Feast lookup."""

    n: int
    columns: dict[str, list]  # feature or key -> one value per row (None = unknown)
    lookup: list[bool]  # row needs its Feast features from the online store

    def entity(self, i: int) -> tuple[int | None, int | None]:
        return tuple(self.columns[k][i] if k in self.columns else None for k in ENTITY_KEYS)  # type: ignore[return-value]


def _check_value(name: str, value: object, row: int) -> object:
    if value is None:
        return None
    if name in _CATEGORY_INDEX:
        if not isinstance(value, str):
            raise InvalidInput(f"instance {row}: {name} must be a string, got {type(value).__name__}")
        return value
    if name in ENTITY_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"instance {row}: {name} must be a non-negative integer, got {value!r}")
        return value
    if name == TRANSACTION_ID:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InvalidInput(f"instance {row}: {TRANSACTION_ID} must be a string, got {value!r}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"instance {row}: {name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"instance {row}: {name} must be finite, got {value!r}")
    return value


def from_instances(body: object, max_instances: int) -> Rows:
    """Parse a v1 body ``{"instances": [{field: value, ...}, ...]}``."""
    if isinstance(body, bytes | str):
        raise InvalidInput("the body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict) or "instances" not in body:
        raise InvalidInput('the body must be a JSON object with an "instances" list')
    extra = set(body) - {"instances", "parameters"}
    if extra:
        raise InvalidInput(f"unknown top-level fields {sorted(extra)}; expected only \"instances\"")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list of objects')
    _check_count(len(instances), max_instances)
    present: list[set[str]] = []
    columns: dict[str, list] = {name: [] for name in ALLOWED}
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instance {i}: must be an object of field: value, got {type(instance).__name__}")
        unknown = set(instance) - ALLOWED
        if unknown:
            raise InvalidInput(f"instance {i}: unknown fields {sorted(unknown)}; "
                               f"expected features {list(MODEL_FEATURES)} or entity keys {list(ENTITY_KEYS)}")
        present.append(set(instance))
        for name in ALLOWED:
            columns[name].append(_check_value(name, instance.get(name), i))
    return _rows(len(instances), columns, present)


def from_tensors(inputs: list, max_instances: int) -> Rows:
    """Parse v2 inputs: one 1-D tensor (shape [n] or [n, 1]) per field, all of the same length."""
    if not inputs:
        raise InvalidInput("the request has no inputs")
    columns: dict[str, list] = {}
    n = None
    for tensor in inputs:
        name = tensor.name
        if name not in ALLOWED:
            raise InvalidInput(f"unknown input {name!r}; expected features {list(MODEL_FEATURES)} "
                               f"or entity keys {list(ENTITY_KEYS)}")
        if name in columns:
            raise InvalidInput(f"input {name!r} appears twice")
        shape = list(tensor.shape)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"input {name!r}: shape {shape} must be [n] or [n, 1]")
        values = list(tensor.data) if tensor.data is not None else []
        if len(values) != shape[0]:
            raise InvalidInput(f"input {name!r}: shape {shape} does not match its {len(values)} values")
        if n is not None and shape[0] != n:
            raise InvalidInput(f"input {name!r} has {shape[0]} rows, the others {n}")
        n = shape[0]
        expected = "BYTES" if name in _CATEGORY_INDEX or name == TRANSACTION_ID else None
        if expected and tensor.datatype != "BYTES":
            raise InvalidInput(f"input {name!r}: datatype must be BYTES, got {tensor.datatype}")
        if not expected and tensor.datatype == "BYTES":
            raise InvalidInput(f"input {name!r}: datatype must be numeric (FP32, FP64, INT32, INT64)")
        if expected:
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
        columns[name] = [_check_value(name, v, i) for i, v in enumerate(values)]
    _check_count(n or 0, max_instances)
    present = [set(columns)] * (n or 0)
    full = {name: columns.get(name, [None] * (n or 0)) for name in ALLOWED}
    return _rows(n or 0, full, present)


def _check_count(n: int, max_instances: int) -> None:
    if n == 0:
        raise InvalidInput("no instances to score")
    if n > max_instances:
        raise InvalidInput(f"too many instances: {n} > {max_instances} (split the request)")


def _rows(n: int, columns: dict[str, list], present: list[set[str]]) -> Rows:
    lookup = []
    for i, fields in enumerate(present):
        missing = [name for name in REQUIRED if name not in fields]
        if missing:
            raise InvalidInput(f"instance {i}: missing request features {missing}")
        has_feast = [name for name in FEAST_NAMES if name in fields]
        if not has_feast:
            absent = [k for k in ENTITY_KEYS if columns[k][i] is None]
            if absent:
                raise InvalidInput(f"instance {i}: send all of {list(FEAST_NAMES)} or the entity keys "
                                   f"{list(ENTITY_KEYS)} to look them up; missing {absent}")
            lookup.append(True)
        elif len(has_feast) < len(FEAST_NAMES):
            missing = [name for name in FEAST_NAMES if name not in fields]
            raise InvalidInput(f"instance {i}: incomplete features, missing {missing} "
                               "(send all of them, or none with the entity keys)")
        else:
            lookup.append(False)
    return Rows(n, columns, lookup)


def to_matrix(rows: Rows) -> np.ndarray:
    """The model's float32 input, ``MODEL_FEATURES`` in order; unknowns and unseen categories are NaN."""
    out = np.full((rows.n, len(MODEL_FEATURES)), np.nan, dtype=np.float32)
    for j, name in enumerate(MODEL_FEATURES):
        index = _CATEGORY_INDEX.get(name)
        for i, value in enumerate(rows.columns[name]):
            if value is None:
                continue
            out[i, j] = index.get(value, np.nan) if index is not None else value
    return out
