"""uvicorn, made fit to face the internet: bounded request heads, connections and idling.

Both HTTP servers of the worker (the load-balancing server and the local endpoint)
run uvicorn with the `GuardedHttp` protocol below and `config()`'s settings:
- a request head (request line and headers) larger than `MAX_HEAD_BYTES` is answered
  431 at once, before the rest of it is read;
- a request head not complete `HEAD_TIMEOUT` seconds after its first byte (or after
  the connection opened) is answered 408 and the connection closed (slow clients cannot
  hold connections open);
- an idle keep-alive connection is closed after `KEEP_ALIVE` seconds;
- beyond `MAX_CONNECTIONS` open connections, a new one is answered 503 and closed.
Request bodies are bounded by the applications (413), as they read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10
HEAD_TIMEOUT = 10.0
KEEP_ALIVE = 5
MAX_CONNECTIONS = 1024
LINGER = 1.0
REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"more than {self.max_connections} connections are open")
            return
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._arm()
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, f"the request head is larger than {self.max_head_bytes} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s")

    def _refuse(self, status: int, why: str) -> None:
        """Answer `status` with an OpenAI error body, whatever was read so far, and close.
        The close lingers (input read and dropped for `LINGER` s): closing with unread input
        would reset the connection and lose the answer before the client reads it."""
        self._refused = True
        self._disarm()
        body = json.dumps({"error": {"message": f"Refused: {why}.", "type": REASONS[status],
                                     "param": None, "code": status}}).encode()
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        with contextlib.suppress(RuntimeError):  # the transport closed meanwhile
            self.transport.write(head + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)


def config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn's Config with the guarded protocol and the limits above."""
    return uvicorn.Config(app, http=GuardedHttp, timeout_keep_alive=KEEP_ALIVE,
                          log_level="warning", lifespan="off", **options)


class Server(uvicorn.Server):
    """uvicorn whose signals are the serve context's: one drain for the whole worker."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
