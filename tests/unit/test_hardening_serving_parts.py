"""Hardening of serving's plain helpers: the payload parser under generated strange inputs, request ids,
the v2 binary tensor extension, and the inference log's bound on unwritten records."""

import json
import math
import random
import sqlite3
import struct

import numpy as np
import pytest
from kserve.errors import InvalidInput

from driftloop.contracts import ENTITY_KEYS, MODEL_FEATURES, TRANSACTION_ID
from serving import payload
from serving.inference_log import InferenceLog, SqliteSink

pytestmark = pytest.mark.unit

GOOD = {"customer_id": 7, "merchant_id": 3, "amount": 120.5, "channel": "online", "hour_of_day": 3}
FIELDS = [*MODEL_FEATURES, *ENTITY_KEYS, TRANSACTION_ID, "colour"]
STRANGE = [None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**400,
           1e308, -1e308, 3.5e38, 5e-324, math.nan, math.inf, -math.inf, "", "x" * 128, "x" * 129, "\x00", "\n",
           "ü", "😀", "日本", "NaN", "Infinity", "1e999", [], [1], [[1]], [None], {}, {"a": 1}, b"\xff", "pos"]
DATATYPES = [*payload.DATATYPES, "FP128", "", 3, None]


def strange(rng: random.Random) -> object:
    value = rng.choice(STRANGE)
    if rng.random() < 0.1:  # nested a level or two
        value = [value] * rng.randint(0, 3)
    return value


def v1_bodies(rng: random.Random, n: int):
    for _ in range(n):
        instance = dict(GOOD)
        for _ in range(rng.randint(1, 3)):
            instance[rng.choice(FIELDS)] = strange(rng)
        shape = rng.random()
        if shape < 0.8:
            yield {"instances": [instance] * rng.randint(0, 3)}
        elif shape < 0.9:
            yield {"instances": strange(rng)}
        else:
            yield strange(rng)


def v2_bodies(rng: random.Random, n: int):
    for _ in range(n):
        inputs = [{"name": k, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "INT64", "data": [v]}
                  for k, v in GOOD.items()]
        for _ in range(rng.randint(1, 3)):
            item = rng.choice(inputs)
            key = rng.choice(["name", "shape", "datatype", "data", "data", "extra"])
            if key == "shape":
                item[key] = [strange(rng)] * rng.randint(0, 2)
            elif key == "datatype":
                item[key] = rng.choice(DATATYPES)
            elif key == "data":
                item[key] = [strange(rng) for _ in range(rng.randint(0, 2))]
            else:
                item[key] = strange(rng)
        body = {"inputs": inputs}
        if rng.random() < 0.3:
            body["id"] = strange(rng)
        yield body if rng.random() < 0.95 else strange(rng)


def encode(value: object) -> object:
    """What a JSON body can carry: bytes become text, non-finite numbers stay (orjson refuses them later)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def parsed_or_refused(parse) -> payload.Rows | None:
    try:
        rows = parse()
    except InvalidInput:
        return None
    matrix = payload.to_matrix(rows)  # what is accepted must also score
    assert matrix.shape == (rows.n, len(MODEL_FEATURES))
    assert not np.isinf(matrix).any()
    for name, column in rows.columns.items():
        for value in column:
            if isinstance(value, str):
                assert len(value) <= payload.MAX_TEXT and value.isprintable(), name
            elif name in ENTITY_KEYS and value is not None:
                assert 0 <= value <= payload.MAX_ENTITY_ID
    return rows


def test_generated_strange_payloads_are_parsed_or_refused_with_invalid_input_only():
    rng = random.Random(20261130)
    accepted = refused = 0
    for body in v1_bodies(rng, 3_000):
        rows = parsed_or_refused(lambda body=body: payload.from_instances(encode(body), 10))
        accepted, refused = accepted + (rows is not None), refused + (rows is None)
    for body in v2_bodies(rng, 3_000):
        rows = parsed_or_refused(lambda body=body: payload.from_tensors(payload.v2_request(encode(body))[0], 10))
        accepted, refused = accepted + (rows is not None), refused + (rows is None)
        if isinstance(body, dict) and isinstance(body.get("inputs"), list):  # the same as binary tensors
            raw = binary_body(body, rng)
            if raw is not None:
                parsed_or_refused(lambda raw=raw: payload.from_tensors(payload.v2_binary(*raw)[0], 10))
    assert accepted > 100 and refused > 1_000  # the generator reaches both sides


def binary_body(body: dict, rng: random.Random) -> tuple[bytes, int] | None:
    """``body`` in the binary tensor extension (one input's data moved after the JSON), sometimes cut short."""
    inputs = [dict(item) if isinstance(item, dict) else item for item in body["inputs"]]
    blobs = []
    for item in inputs:
        if isinstance(item, dict) and isinstance(item.get("data"), list) and rng.random() < 0.5:
            data = item.pop("data")
            if item.get("datatype") == "BYTES":
                blob = b"".join(struct.pack("<I", len(s)) + s for s in
                                (v if isinstance(v, bytes) else str(v).encode() for v in data))
            else:
                try:
                    with np.errstate(all="ignore"):  # values past the type's range wrap or overflow: the point
                        blob = np.array(data, dtype=payload.DATATYPES.get(item.get("datatype")) or "<f8").tobytes()
                except (TypeError, ValueError, OverflowError):
                    blob = rng.randbytes(rng.randint(0, 9))
            item["parameters"] = {"binary_data_size": rng.choice([len(blob), len(blob) + 1, -1, "4"])}
            blobs.append(blob)
    try:
        head = json.dumps({**body, "inputs": inputs}).encode()
    except (TypeError, ValueError):
        return None
    tail = b"".join(blobs)
    if rng.random() < 0.2:
        tail = tail[:rng.randint(0, len(tail))]
    return head + tail, rng.choice([len(head)] * 8 + [0, len(head) + 1, 10**9])


def test_binary_tensors_parse_to_the_same_rows_as_json():
    body = {"id": "r-1", "inputs": [
        {"name": "customer_id", "shape": [2], "datatype": "INT64", "data": [7, 8]},
        {"name": "merchant_id", "shape": [2, 1], "datatype": "INT64", "data": [3, 4]},
        {"name": "amount", "shape": [2], "datatype": "FP32", "data": [120.5, 3.0]},
        {"name": "channel", "shape": [2], "datatype": "BYTES", "data": ["online", "pos"]},
        {"name": "hour_of_day", "shape": [2], "datatype": "INT64", "data": [3, 14]}]}
    amounts = np.array([120.5, 3.0], dtype="<f4").tobytes()
    channels = b"".join(struct.pack("<I", len(s)) + s for s in (b"online", b"pos"))
    binary = json.loads(json.dumps(body))
    binary["inputs"][2] = {**binary["inputs"][2], "parameters": {"binary_data_size": len(amounts)}}
    binary["inputs"][3] = {**binary["inputs"][3], "parameters": {"binary_data_size": len(channels)}}
    del binary["inputs"][2]["data"], binary["inputs"][3]["data"]
    head = json.dumps(binary).encode()
    tensors, request_id = payload.v2_binary(head + amounts + channels, len(head))
    expected, expected_id = payload.v2_request(body)
    assert request_id == expected_id == "r-1"
    assert payload.from_tensors(tensors, 10).columns == payload.from_tensors(expected, 10).columns


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff\xfe", "not UTF-8"),
    (b"x" * (payload.MAX_TEXT + 1), f"the limit is {payload.MAX_TEXT}"),
    (b"a\nb", "printable"),
])
def test_a_request_id_is_bounded_printable_text(raw, message):
    with pytest.raises(InvalidInput, match=message):
        payload.request_id(raw, "the X-Request-Id header")
    assert payload.request_id(b"x" * payload.MAX_TEXT, "h") == "x" * payload.MAX_TEXT
    assert payload.request_id(b"", "h") is None and payload.request_id(None, "h") is None
    assert payload.request_id(42, "h") == "42"


def test_the_first_500_classes_are_invalid_input():
    """The four inputs that answered 500: an entity id past int64, a bool shape, invalid UTF-8 in BYTES data
    (the header's own case is above)."""
    with pytest.raises(InvalidInput, match="customer_id must be a non-negative integer up to"):
        payload.from_instances({"instances": [{**GOOD, "customer_id": 2**63}]}, 10)
    with pytest.raises(InvalidInput, match="shape must be a list of non-negative integers"):
        payload.v2_request({"inputs": [{"name": "amount", "shape": [True], "datatype": "FP32", "data": [1.0]}]})
    with pytest.raises(InvalidInput, match="not UTF-8"):
        payload.from_tensors([payload.Tensor("channel", [1], "BYTES", [b"\xff"])], 10)
    with pytest.raises(InvalidInput, match="within"):  # an int too large for a float, and one past float32
        payload.from_instances({"instances": [{**GOOD, "amount": 10**400}]}, 10)
    with pytest.raises(InvalidInput, match="within"):
        payload.from_instances({"instances": [{**GOOD, "amount": 1e39}]}, 10)


def record(i: int) -> tuple:
    return (f"r{i}", 1.0, "m", "1", None, 1, 2, *([0.0] * len(MODEL_FEATURES)), 0.5, 1.0)


def test_unwritten_records_never_exceed_the_bound_while_the_store_is_away(tmp_path):
    """The bound counts records from hand-over to commit, the batch being retried included: what a
    SIGKILL can lose. Beyond it records are dropped and counted."""
    path = tmp_path / "log.db"
    log = InferenceLog(SqliteSink(path), max_rows=100, retry_s=60).start()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the store is away
    try:
        for i in range(150):
            log.record([record(i), record(1_000 + i)])  # two rows a request
        assert (log.depth(), log.dropped) == (100, 200)
    finally:
        holder.execute("COMMIT")
        holder.close()
    log.close()
    assert (log.written, log.dropped, log.depth()) == (100, 200, 0)
