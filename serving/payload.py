"""Request payloads to feature rows: v1 instances and v2 (Open Inference Protocol) tensors.

The policy, the same for both protocols:
- a field that is not a feature, an entity key or ``transaction_id`` is an error (400) naming it;
- a request feature that is missing is an error; one sent as ``null`` is an unknown value, scored and
  logged (the drift monitor counts nulls, out-of-range values and unseen categories: rejecting them here
  would hide them);
- the Feast features are either all in the request, or all absent with both entity keys present, in
  which case they are looked up in the online store;
- numbers must be finite JSON numbers within the model's float32 range, categories strings, entity keys
  integers from 0 to 2^63 - 1 (the online store's int64);
- text that is stored with every prediction (a category, ``transaction_id``, the request id from the v2
  ``id`` or the ``X-Request-Id`` header) is at most ``MAX_TEXT`` printable characters: a longer one is an
  error naming the limit, never cut (two ids cut to one prefix would join two requests in the log). One
  request therefore stores at most ``max_instances`` rows of bounded size, whatever its body holds.

Every malformed input raises ``kserve.errors.InvalidInput`` (a 400 naming the problem), never another
exception: a client's mistake must not be a 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve.errors import InvalidInput

from driftloop.contracts import BY_NAME, ENTITY_KEYS, FEAST_FEATURES, MODEL_FEATURES, REQUEST_FEATURES, TRANSACTION_ID

ALLOWED = frozenset((*MODEL_FEATURES, *ENTITY_KEYS, TRANSACTION_ID))
REQUIRED = tuple(c.name for c in REQUEST_FEATURES if c.max_null_rate == 0.0)
FEAST_NAMES = tuple(c.name for c in FEAST_FEATURES)
_CATEGORY_INDEX = {c.name: {v: float(i) for i, v in enumerate(c.categories)} for c in BY_NAME.values()
                   if c.kind == "category"}
MAX_TEXT = 128  # characters of any text stored per prediction (ids, categories): a UUID or trace id fits
MAX_ENTITY_ID = 2**63 - 1  # Feast's entity keys are int64
FLOAT32_MAX = float(np.finfo(np.float32).max)
# The Open Inference Protocol's tensor datatypes, as little-endian numpy types (BYTES: length-prefixed items).
DATATYPES = {"BOOL": "|b1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
             "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
             "BYTES": None}


@dataclass(frozen=True)
class Tensor:
    """A v2 input tensor: ``data`` flat, row-major (JSON values, or decoded from the binary extension)."""

    name: str
    shape: list
    datatype: str
    data: list | None


@dataclass
class Rows:
    """A parsed request: raw values per feature (for the log) and which rows need a Feast lookup."""

    n: int
    columns: dict[str, list]  # feature or key -> one value per row (None = unknown)
    lookup: list[bool]  # row needs its Feast features from the online store

    def entity(self, i: int) -> tuple[int | None, int | None]:
        return tuple(self.columns[k][i] if k in self.columns else None for k in ENTITY_KEYS)  # type: ignore[return-value]


def _show(value: object) -> str:
    """A value for an error message, cut short: a message never echoes a whole body back."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def stored_text(value: str, what: str) -> str:
    """``value`` if it may be stored with every prediction: at most ``MAX_TEXT`` printable characters."""
    if len(value) > MAX_TEXT:
        raise InvalidInput(f"{what} is {len(value):,} characters; the limit is {MAX_TEXT} (it is stored with "
                           "every prediction): send a shorter one")
    if not value.isprintable():
        raise InvalidInput(f"{what} has control or non-printable characters: send printable text")
    return value


def request_id(value: object, what: str) -> str | None:
    """A client's request id (v2 ``id``, ``X-Request-Id`` as raw bytes) checked for storage; None if absent."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise InvalidInput(f"{what} is not UTF-8 text: send printable text") from None
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    return stored_text(str(value), what)


def _check_value(name: str, value: object, row: int) -> object:
    if value is None:
        return None
    if name in _CATEGORY_INDEX:
        if not isinstance(value, str):
            raise InvalidInput(f"instance {row}: {name} must be a string, got {type(value).__name__}")
        return stored_text(value, f"instance {row}: {name}")
    if name in ENTITY_KEYS:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ENTITY_ID:
            raise InvalidInput(f"instance {row}: {name} must be a non-negative integer up to {MAX_ENTITY_ID} "
                               f"(int64), got {_show(value)}")
        return value
    if name == TRANSACTION_ID:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InvalidInput(f"instance {row}: {TRANSACTION_ID} must be a string, got {_show(value)}")
        return stored_text(str(value), f"instance {row}: {TRANSACTION_ID}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"instance {row}: {name} must be a number, got {type(value).__name__} {_show(value)}")
    try:
        number = float(value)  # the log's columns are floating point: an int beyond 2^63 must not reach it
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise InvalidInput(f"instance {row}: {name} must be finite and within ±{FLOAT32_MAX:.3g} "
                           f"(the model's float32), got {_show(value)}")
    return number


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


def v2_request(body: Any) -> tuple[list[Tensor], str | None]:
    """A JSON v2 body ``{"id"?, "inputs": [{name, shape, datatype, data}, ...]}``: its tensors and id."""
    return _v2_inputs(body, None), _body_id(body)


def v2_binary(raw: bytes, json_length: int) -> tuple[list[Tensor], str | None]:
    """A v2 body in the binary tensor extension: ``json_length`` bytes of JSON (the
    ``Inference-Header-Content-Length`` header), then each input with ``parameters.binary_data_size`` in
    order: fixed-size types little-endian, BYTES items each a 4-byte little-endian length and the bytes."""
    if not 0 < json_length <= len(raw):
        raise InvalidInput(f"Inference-Header-Content-Length is {json_length}, but the body has {len(raw)} bytes")
    try:
        body = orjson.loads(raw[:json_length])
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"Unrecognized request format: {error}") from error
    tensors = _v2_inputs(body, memoryview(raw)[json_length:])
    return tensors, _body_id(body)


def _body_id(body: dict) -> str | None:
    return request_id(body.get("id"), 'the v2 "id"')


def _v2_inputs(body: Any, binary: memoryview | None) -> list[Tensor]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidInput('the body must be a JSON object with an "inputs" list')
    tensors, offset = [], 0
    for i, item in enumerate(body["inputs"]):
        if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= set(item):
            raise InvalidInput(f"input {i}: needs name, shape, datatype and data")
        name, datatype = item["name"], item["datatype"]
        if not isinstance(name, str) or datatype not in DATATYPES:
            raise InvalidInput(f"input {i}: name must be a string and datatype one of {list(DATATYPES)}, "
                               f"got {_show(name)} and {_show(datatype)}")
        shape = _shape(name, item["shape"])
        parameters = item.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if "data" in item:
            if not isinstance(item["data"], list):
                raise InvalidInput(f"input {name!r}: data must be a flat list (row-major)")
            data = item["data"]
        elif binary is not None and size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise InvalidInput(f"input {name!r}: binary_data_size {_show(size)} does not fit the "
                                   f"{len(binary) - offset} bytes of binary data left")
            data = _decode(name, datatype, shape, binary[offset:offset + size])
            offset += size
        else:
            raise InvalidInput(f"input {name!r}: needs data (or parameters.binary_data_size with the binary "
                               "tensor extension)")
        tensors.append(Tensor(name, shape, datatype, data))
    if binary is not None and offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the last input's")
    return tensors


def _shape(name: str, shape: object) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers, got {_show(shape)}")
    return shape


def _decode(name: str, datatype: str, shape: list[int], chunk: memoryview) -> list:
    """One input's binary data as a flat list; its size must match the shape."""
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    if dtype is not None:
        itemsize = np.dtype(dtype).itemsize
        if len(chunk) != count * itemsize:
            raise InvalidInput(f"input {name!r}: {len(chunk)} bytes of {datatype} do not make shape {shape}")
        return np.frombuffer(chunk, dtype=dtype).tolist()
    items, pos = [], 0
    while pos < len(chunk) and len(items) <= count:
        length = int.from_bytes(chunk[pos:pos + 4], "little") if pos + 4 <= len(chunk) else -1
        if length < 0 or pos + 4 + length > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES item {len(items)} runs past its binary data")
        items.append(bytes(chunk[pos + 4:pos + 4 + length]))
        pos += 4 + length
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: {len(items)} BYTES items do not make shape {shape}")
    return items


def from_tensors(inputs: list, max_instances: int) -> Rows:
    """Parse v2 inputs: one 1-D tensor (shape [n] or [n, 1]) per field, all of the same length."""
    if not inputs:
        raise InvalidInput("the request has no inputs")
    columns: dict[str, list] = {}
    n = None
    for tensor in inputs:
        name = tensor.name
        if name not in ALLOWED:
            raise InvalidInput(f"unknown input {_show(name)}; expected features {list(MODEL_FEATURES)} "
                               f"or entity keys {list(ENTITY_KEYS)}")
        if name in columns:
            raise InvalidInput(f"input {name!r} appears twice")
        shape = _shape(name, list(tensor.shape))
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
            raise InvalidInput(f"input {name!r}: datatype must be BYTES, got {_show(tensor.datatype)}")
        if not expected and tensor.datatype == "BYTES":
            raise InvalidInput(f"input {name!r}: datatype must be numeric (FP32, FP64, INT32, INT64)")
        if expected:
            values = [_utf8(name, v, i) for i, v in enumerate(values)]
        columns[name] = [_check_value(name, v, i) for i, v in enumerate(values)]
    _check_count(n or 0, max_instances)
    present = [set(columns)] * (n or 0)
    full = {name: columns.get(name, [None] * (n or 0)) for name in ALLOWED}
    return _rows(n or 0, full, present)


def _utf8(name: str, value: object, row: int) -> object:
    if not isinstance(value, bytes | bytearray):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"instance {row}: {name} is not UTF-8 text") from None


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
