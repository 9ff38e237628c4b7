"""uvicorn, made fit to face the internet: every connection state bounded in time and size.

Both HTTP servers of the worker (the load-balancing server and the local endpoint) run
uvicorn with the `GuardedHttp` protocol below and `config()`'s settings:
- a request head (request line and headers, not the body that may come in the same read)
  larger than `MAX_HEAD_BYTES` is answered 431 at once, before the rest of it is read;
- a request head not complete `HEAD_TIMEOUT` seconds after its first byte (or after the
  connection opened) is answered 408 and the connection closed;
- a request body that sends nothing for `BODY_TIMEOUT` seconds, or is not complete
  `BODY_DEADLINE` seconds after its head, is answered 408 and the connection closed; the
  application then reads a disconnect, never a body cut short as if it were whole;
- an answer the client does not read for `WRITE_TIMEOUT` seconds ends the connection (the
  application sees the client gone, and vLLM's generation is aborted);
- an idle keep-alive connection is closed after `KEEP_ALIVE` seconds;
- beyond `MAX_CONNECTIONS` open connections, a new one is answered 503 and closed;
- a request that asks to switch protocols is answered 400 when it asks for a websocket or
  carries a body (the parser would hand the body to the new protocol, never to the
  application); one without a body is answered in HTTP/1.1 and the connection closed;
- an HTTP/1.0 request gets a body of unknown length (a stream) as is, ended by closing the
  connection, since HTTP/1.0 has no chunked encoding.
Request bodies are bounded in size by the applications (413), as they read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_HEAD_BYTES = 64 << 10
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
BODY_DEADLINE = 120.0
WRITE_TIMEOUT = 60.0
# Longer than the clients' pools keep an idle connection (httpx and so the OpenAI client
# 5 s, aiohttp and so OpenWebUI 15 s): the client always drops it first. At the same
# length both ends close at once, and a request sent on a connection the server is
# closing fails (a POST is not retried).
KEEP_ALIVE = 30
MAX_CONNECTIONS = 1024
LINGER = 1.0
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class CloseDelimited(RequestResponseCycle):
    """An HTTP/1.0 request's cycle: a body of unknown length goes out as is and ends with
    the connection (uvicorn would chunk it, which an HTTP/1.0 client cannot read)."""

    unbounded = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            named = {name.lower() for name, _ in message.get("headers", [])}
            if not named & {b"content-length", b"transfer-encoding"} \
                    and self.scope["method"] != "HEAD" and message["status"] not in (204, 304):
                self.unbounded = True
                self.chunked_encoding = False  # uvicorn's own send then writes bytes as given
                self.expected_content_length = sys.maxsize
        elif self.unbounded and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))  # this is the end
        await super().send(message)


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT
    body_timeout = BODY_TIMEOUT
    body_deadline = BODY_DEADLINE
    write_timeout = WRITE_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = True
        self._in_body = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._body_began = self._body_read = 0.0
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"more than {self.max_connections} connections are open")
            return
        self._arm(self.head_timeout, self._head_too_slow)

    def _arm(self, delay: float, check: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, check)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        # Only the head counts towards its limit: it is fed in slices no larger than the
        # room left, so body bytes read together with it are never counted.
        while self._in_head and data and not self._refused:
            room = self.max_head_bytes - self._head_bytes
            if room <= 0:
                self._refuse(431, f"the request head is larger than {self.max_head_bytes} bytes")
                return
            if self._timer is None:
                self._arm(self.head_timeout, self._head_too_slow)
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
        if data and not self._refused:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        upgrade = self._get_upgrade()
        if upgrade is not None:
            if upgrade == b"websocket":
                self._refuse(400, "this server does not serve WebSocket connections; send "
                                  "plain HTTP requests")
                return
            if self._has_body():
                self._refuse(400, f"a request that asks to switch protocols (Upgrade: "
                                  f"{upgrade.decode('latin-1')[:40]}) cannot carry a body "
                                  "here; send it without the Upgrade header")
                return
        super().on_headers_complete()
        if upgrade is not None:
            self.cycle.keep_alive = False  # the parser hands the rest to the other protocol
        if self.scope["http_version"] == "1.0":
            self.cycle.__class__ = CloseDelimited
        self._in_body = True
        self._body_began = self._body_read = self.loop.time()
        self._arm(self.body_timeout, self._body_too_slow)

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length"
                                                and value.strip() not in (b"", b"0")):
                return True
        return False

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_read = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._disarm()
        self._in_head, self._head_bytes = True, 0  # what comes next is the next request's
        super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """Upgrades are answered in on_headers_complete; nothing to warn about."""

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm(self.head_timeout, self._head_too_slow)  # a pipelined head: after this
            return
        self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s")

    def _body_too_slow(self) -> None:
        self._timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the application is not reading yet: not the client's fault
            self._body_read = now
        if now - self._body_read >= self.body_timeout:
            why = f"the request body sent nothing for {self.body_timeout:g} s"
        elif now - self._body_began >= self.body_deadline:
            why = f"the request body did not arrive within {self.body_deadline:g} s"
        else:
            self._arm(min(self._body_read + self.body_timeout,
                          self._body_began + self.body_deadline) - now, self._body_too_slow)
            return
        cycle = self.cycle
        cycle.disconnected = True  # the application reads a disconnect, not a cut body
        cycle.message_event.set()
        if cycle.response_started:
            self.transport.close()
        else:
            self._refuse(408, why)

    def _write_stalled(self) -> None:
        """The client has read nothing of the answer for `write_timeout`: drop it."""
        self._write_timer = None
        self.transport.abort()

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
    """uvicorn's Config with the guarded protocol and the limits above (no websockets: an
    upgrade request is answered by the protocol, never handed to a websocket library)."""
    return uvicorn.Config(app, http=GuardedHttp, ws="none", timeout_keep_alive=KEEP_ALIVE,
                          log_level="warning", lifespan="off", **options)


class Server(uvicorn.Server):
    """uvicorn whose signals are the serve context's: one drain for the whole worker."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
