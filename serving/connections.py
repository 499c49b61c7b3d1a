"""The HTTP connection layer under the server: bounded request heads, idle and slow connections closed.

uvicorn's httptools protocol, as KServe runs it, reads a request head of any size (a 256 MB header was
read and answered 200) and arms no timer before a connection's first request, so a socket that sends
nothing stays open until its client leaves (hundreds of them, near the file limit, starve real clients).
``guarded_protocol`` returns the same protocol with, per connection:

- a limit on the request line and headers together (``max_head_bytes``): over it, 431 and a JSON error;
- a deadline for each request head (``head_timeout_s``), counted from the connection's opening or, on a
  kept-alive connection, from the request's first byte: a connection that sends nothing is closed (and
  counted in ``driftloop_connections_closed_total{reason="idle"}``), a head sent too slowly gets 408;
- between requests, uvicorn's own keep-alive timeout (``timeout_keep_alive``).

A refused connection is closed gracefully: the answer is sent, then the write side is shut and what the
client still sends is read and dropped for up to ``LINGER_S`` seconds, so that it reads the answer rather
than a reset. The body's own deadline is the front door's (``serving.fastpath``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

LINGER_S = 2.0


def guarded_protocol(max_head_bytes: int, head_timeout_s: float,
                     on_refused: Callable[[int], None], on_idle: Callable[[], None]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits (pass it as ``uvicorn.Config(http=...)``)."""
    return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {
        "max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s,
        "on_refused": staticmethod(on_refused), "on_idle": staticmethod(on_idle)})


class GuardedProtocol(HttpToolsProtocol):
    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0
    on_refused: Callable[[int], None] = staticmethod(lambda status: None)  # a request answered here (431, 408, 400)
    on_idle: Callable[[], None] = staticmethod(lambda: None)  # a connection closed for sending nothing

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_seen = 0  # bytes of the current head: exact from the parser, at least the whole chunks fed
        self._head_started = False  # a byte of the current head has arrived
        self._in_body = False  # between a head's end and its message's end
        self._heads = 0  # heads parsed on this connection
        self._refused = False  # answered here; what the client still sends is dropped

    # connection -----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        in_head, heads = not self._in_body, self._heads
        if in_head:
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:  # a limit already answered; otherwise the request itself is malformed
                self._refuse(400, "invalid HTTP request")
            return
        if in_head and not self._in_body and heads == self._heads:
            # The whole chunk was head: the parser buffers a header until it ends, so count it here.
            self._head_seen += len(data)
            self._head_over_limit()

    # parser callbacks ------------------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._head_seen += len(url)
        if self._head_over_limit():
            raise _Refused  # stops the parser: data_received sees a parser error, already answered
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_seen += len(name) + len(value) + 4
        if self._head_over_limit():
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_seen, self._head_started, self._in_body = 0, False, True
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    # limits ---------------------------------------------------------------------------------------
    def _head_over_limit(self) -> bool:
        """Answer 431 once the current head is over the limit; True if it is."""
        if self._head_seen > self.max_head_bytes and not self._refused:
            self._refuse(431, f"request line and headers over the limit of {self.max_head_bytes} bytes: "
                              "send fewer or shorter headers")
        return self._refused

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._in_body:
            return
        if self._head_started:
            self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")
        elif self.cycle is None or self.cycle.response_complete:  # nothing sent, nothing in flight: reap
            self.on_idle()
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer with a JSON error, shut the write side, drop what still comes, close after ``LINGER_S``."""
        self._refused = True
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:  # a response is under way: just close
            self.transport.close()
            return
        body = orjson.dumps({"error": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.on_refused(status)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # uvicorn's own, for its other parser errors
        if not self._refused:
            self._refuse(400, msg)


class _Refused(Exception):
    pass
