"""The server's front door, a pure ASGI layer in front of KServe's FastAPI app.

It counts every request by protocol and status, refuses bodies over the limit (413) before reading
them, and answers the two hot endpoints itself: ``POST /v1/models/<name>:predict`` and JSON
``POST /v2/models/<name>/infer``. They run the model's own parse/score/response code, so the answers are
the ones KServe's route would give, without the framework's per-request cost (routing, dependency
injection, a timing middleware). Everything else (metadata, health, ``:explain``, the v2 binary tensor
extension, unknown models) goes on to KServe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from kserve.errors import InvalidInput

from serving.metrics import Metrics

JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class Tensor:
    """A v2 input tensor as ``serving.payload.from_tensors`` reads it."""

    name: str
    shape: list
    datatype: str
    data: list | None


def v2_inputs(body: Any) -> tuple[list[Tensor], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise InvalidInput('the body must be a JSON object with an "inputs" list')
    tensors = []
    for i, item in enumerate(body["inputs"]):
        if not isinstance(item, dict) or not {"name", "shape", "datatype", "data"} <= set(item):
            raise InvalidInput(f"input {i}: needs name, shape, datatype and data")
        if not isinstance(item["shape"], list) or not isinstance(item["data"], list):
            raise InvalidInput(f"input {i}: shape and data must be lists")
        tensors.append(Tensor(str(item["name"]), item["shape"], str(item["datatype"]), item["data"]))
    request_id = body.get("id")
    return tensors, str(request_id) if request_id is not None else None


class FrontDoor:
    def __init__(self, app, model, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.model = model
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.v1 = f"/v1/models/{model.name}:predict"
        self.v2 = f"/v2/models/{model.name}/infer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        protocol = "v1" if path.startswith("/v1/") else "v2" if path.startswith("/v2/") else "other"
        start = time.perf_counter()
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._reply(send, protocol, start, 413, {"error": self._too_large()})
        hot = scope["method"] == "POST" and (
            path == self.v1 or (path == self.v2 and b"inference-header-content-length" not in headers))
        if hot:
            status, body = await self._hot(path == self.v1, headers, receive)
            return await self._reply(send, protocol, start, status, body)

        status = 500
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge
            return message

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        except _TooLarge:
            return await self._reply(send, protocol, start, 413, {"error": self._too_large()})
        self._count(protocol, status, start)
        return None

    async def _hot(self, v1: bool, headers: dict, receive) -> tuple[int, Any]:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499, {"error": "client disconnected"}
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return 413, {"error": self._too_large()}
            chunks.append(chunk)
            more = message.get("more_body", False)
        content_type = headers.get(b"content-type", b"")
        try:
            if not content_type.startswith(b"application/json"):
                raise InvalidInput("the body must be JSON (Content-Type: application/json)")
            try:
                body = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError as error:
                raise InvalidInput(f"Unrecognized request format: {error}") from error
            request_id = (headers.get(b"x-request-id") or b"").decode() or None
            if v1:
                scored = await self.model.score(self.model.parse(body), request_id)
                return 200, scored.v1()
            tensors, body_id = v2_inputs(body)
            from serving import payload

            rows = payload.from_tensors(tensors, self.model.max_instances)
            scored = await self.model.score(rows, request_id or body_id)
            return 200, scored.v2(self.model.name)
        except InvalidInput as error:
            return 400, {"error": str(error)}

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_body} bytes"

    async def _reply(self, send, protocol: str, start: float, status: int, body: Any) -> None:
        data = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        self._count(protocol, status, start)

    def _count(self, protocol: str, status: int, start: float) -> None:
        self.metrics.requests.labels(protocol, str(status)).inc()
        self.metrics.latency.labels(protocol).observe(time.perf_counter() - start)


class _TooLarge(Exception):
    pass
