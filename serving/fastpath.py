"""The server's front door, a pure ASGI layer in front of KServe's FastAPI app.

It counts every request by protocol and status (a 5xx included, whichever layer failed), refuses bodies over
the limit (413) and bodies that arrive too slowly (408), and answers three endpoints itself:
``POST /v1/models/<name>:predict``, ``POST /v2/models/<name>/infer`` (JSON, and the binary tensor
extension) and ``GET /v2/models/<name>/ready``. The two inference endpoints run the model's own
parse/score/response code, so the answers are the ones KServe's routes would give, without the framework's
per-request cost (routing, dependency injection, a timing middleware), and every malformed input is a 400
with a JSON error. Everything else (metadata, health, ``:explain``, unknown models) goes on to KServe.

A body over the limit is read and dropped (up to ``DRAIN_FACTOR`` times the limit, within the request
timeout) before the 413 is sent: a client that writes its whole body before it reads (Python's urllib and
``http.client``, which also ask to close the connection) otherwise finds the connection reset, not the 413.
A body larger still gets the 413 at once, with ``connection: close``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from kserve.errors import InvalidInput

from serving import payload
from serving.metrics import Metrics
from serving.payload import Tensor

__all__ = ["DRAIN_FACTOR", "FrontDoor", "Tensor"]

log = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]
CLOSE = [(b"connection", b"close")]
DRAIN_FACTOR = 16  # bodies up to 16x the limit are read and dropped so that the client reads its 413


class FrontDoor:
    def __init__(self, app, model, metrics: Metrics, max_body_bytes: int, request_timeout_s: float = 10.0,
                 readiness: Callable[[], tuple[bool, dict]] | None = None) -> None:
        self.app = app
        self.model = model
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.timeout = request_timeout_s
        self.readiness = readiness
        self.v1 = f"/v1/models/{model.name}:predict"
        self.v2 = f"/v2/models/{model.name}/infer"
        self.ready = f"/v2/models/{model.name}/ready"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        protocol = "v1" if path.startswith("/v1/") else "v2" if path.startswith("/v2/") else "other"
        start = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.timeout  # the body must have arrived by then
        headers = dict(scope["headers"])
        method = scope["method"]
        if method == "GET" and path == self.ready and self.readiness is not None:
            ready, detail = self.readiness()
            return await self._reply(send, protocol, start, 200 if ready else 503, detail)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            drained = int(length) <= self.max_body * DRAIN_FACTOR and await self._drain(receive, headers, deadline)
            return await self._reply(send, protocol, start, 413, {"error": self._too_large()}, close=not drained)
        if method == "POST" and path in (self.v1, self.v2):
            status, body, close = await self._hot(path == self.v1, headers, receive, deadline)
            return await self._reply(send, protocol, start, status, body, close=close)
        return await self._pass(scope, receive, send, protocol, start, deadline, headers)

    async def _pass(self, scope, receive, send, protocol: str, start: float, deadline: float, headers: dict):
        """KServe's routes, with the body limit and deadline applied and every outcome counted."""
        status, started, seen, done = 500, False, 0, False

        async def limited_receive():
            nonlocal seen, done
            if done:  # the body is in: a later receive waits for a disconnect, with no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _TimedOut from None
            seen += len(message.get("body", b""))
            done = not message.get("more_body", False)
            if seen > self.max_body:
                raise _TooLarge
            return message

        async def counting_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        except _TooLarge:
            if started:
                raise
            drained = await self._drain(receive, headers, deadline, seen)
            return await self._reply(send, protocol, start, 413, {"error": self._too_large()}, close=not drained)
        except _TimedOut:
            if started:
                raise
            return await self._reply(send, protocol, start, 408, {"error": self._too_slow()}, close=True)
        except Exception as error:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                self._count(protocol, status, start)
                raise
            return await self._reply(send, protocol, start, 500, _internal(error), close=True)
        self._count(protocol, status, start)
        return None

    async def _hot(self, v1: bool, headers: dict, receive, deadline: float) -> tuple[int, Any, bool]:
        """(status, body, close the connection) of one inference request."""
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout_at(deadline):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return 499, {"error": "client disconnected"}, True
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_body:
                        drained = not more or await self._drain(receive, headers, deadline, size)
                        return 413, {"error": self._too_large()}, not drained
                    chunks.append(chunk)
        except TimeoutError:
            return 408, {"error": self._too_slow()}, True
        try:
            return 200, await self._infer(v1, headers, b"".join(chunks)), False
        except InvalidInput as error:
            return 400, {"error": str(error)}, False
        except Exception as error:  # a fault of ours: answered, counted and logged, the server goes on
            log.exception("%s inference failed", "v1" if v1 else "v2")
            return 500, _internal(error), False

    async def _infer(self, v1: bool, headers: dict, raw: bytes) -> Any:
        request_id = payload.request_id(headers.get(b"x-request-id"), "the X-Request-Id header")
        binary = None if v1 else headers.get(b"inference-header-content-length")
        if binary is None:
            if not headers.get(b"content-type", b"").startswith(b"application/json"):
                raise InvalidInput("the body must be JSON (Content-Type: application/json)")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as error:
                raise InvalidInput(f"Unrecognized request format: {error}") from error
        if v1:
            scored = await self.model.score(self.model.parse(body), request_id)
            return scored.v1()
        if binary is None:
            tensors, body_id = payload.v2_request(body)
        elif binary.isdigit():
            tensors, body_id = payload.v2_binary(raw, int(binary))
        else:
            raise InvalidInput("Inference-Header-Content-Length must be the JSON part's length in bytes")
        rows = payload.from_tensors(tensors, self.model.max_instances)
        scored = await self.model.score(rows, request_id or body_id)
        return scored.v2(self.model.name)

    async def _drain(self, receive, headers: dict, deadline: float, seen: int = 0) -> bool:
        """Read and drop the rest of a refused body; True if it all arrived (the connection can be reused).

        A client that asked ``Expect: 100-continue`` has not sent its body: it is not invited to.
        """
        if headers.get(b"expect", b"").lower() == b"100-continue":
            return False
        try:
            async with asyncio.timeout_at(deadline):
                while seen <= self.max_body * DRAIN_FACTOR:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return False
                    seen += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return True
        except TimeoutError:
            pass
        return False

    def _too_large(self) -> str:
        return f"request body over the limit of {self.max_body} bytes: split the request"

    def _too_slow(self) -> str:
        return f"request body not received within {self.timeout:g} s: send it at once"

    async def _reply(self, send, protocol: str, start: float, status: int, body: Any, close: bool = False) -> None:
        data = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = [*JSON_HEADERS, (b"content-length", str(len(data)).encode()), *(CLOSE if close else ())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        self._count(protocol, status, start)

    def _count(self, protocol: str, status: int, start: float) -> None:
        self.metrics.requests.labels(protocol, str(status)).inc()
        self.metrics.latency.labels(protocol).observe(time.perf_counter() - start)


def _internal(error: Exception) -> dict:
    return {"error": f"internal error ({type(error).__name__}); the server's log has the details"}


class _TooLarge(Exception):
    pass


class _TimedOut(Exception):
    pass
