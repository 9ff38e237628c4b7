"""The tiny HTTP/1.1 server under the stand-in vLLM: asyncio, standard library only.

Why not http.server: a thread and a flush per event cannot write hundreds of streams at
once, and a load test or a benchmark must measure the worker, never its stand-in. Here:

- a connection serves one request at a time (clients do not pipeline; what arrives early
  waits in the buffer); request bodies are read by Content-Length (no chunked uploads);
  `Connection: close` closes the connection after the answer;
- answers carry uvicorn's headers in uvicorn's order (`date`, `server: uvicorn`,
  `content-length`, `content-type`, `vary: Origin`, `transfer-encoding`), as vLLM's do;
- a streamed answer is a `Stream`: chunked, written one step at a time, each step one or
  more HTTP chunks. Unpaced streams are all written by one `Engine`: one step of every
  stream whose socket takes more, then one turn of the event loop, as vLLM emits one
  token per running request per engine step. A paced stream has a task of its own that
  writes step k at start + k * interval. Neither writes to a socket whose send buffer is
  full (TCP back-pressure), and a client that goes away aborts its answer at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
           404: b"Not Found",
           500: b"Internal Server Error", 503: b"Service Unavailable"}
EVENT_STREAM = b"text/event-stream; charset=utf-8"
LAST_CHUNK = b"0\r\n\r\n"


class Clock:
    """uvicorn's `date` header, formatted once a second (not once a request)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = email.utils.formatdate(now, usegmt=True).encode()
        return self._text


CLOCK = Clock()


def head(status: int, content_type: bytes | None, length: int | None) -> bytes:
    """The status line and headers, in uvicorn's order; `length` None means chunked."""
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS[status]), b"date: " + CLOCK.date(),
             b"server: uvicorn"]
    if length is not None:
        lines.append(b"content-length: %d" % length)
    if content_type is not None:
        lines.append(b"content-type: " + content_type)
    lines.append(b"vary: Origin")
    if length is None:
        lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Request:
    """One request as it arrived, body whole."""

    method: str
    target: str  # as sent, query string included
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class App:
    """What a `Server` serves: `handle` must answer every request, at once or later."""

    def handle(self, conn: Connection, request: Request) -> None:
        raise NotImplementedError

    def opened(self, conn: Connection) -> None:
        """A client connected."""

    def closed(self, conn: Connection) -> None:
        """A client's connection is gone (whatever it was being sent was aborted first)."""


class Stream:
    """One chunked answer being written: each item of `steps` is one step's chunks.

    `count` is how many steps there are (None: endless), so that the last chunk goes out
    with the last step; `ended(completed)` is called once, when it is whole or aborted.
    """

    def __init__(self, conn: Connection, steps: Iterator[list[bytes]], count: int | None,
                 ended: Callable[[bool], None]) -> None:
        self.conn, self.steps, self.left, self.ended = conn, steps, count, ended
        self.sent = 0
        self.over = False

    def step(self) -> None:
        pieces = next(self.steps)
        data = chunk(pieces[0]) if len(pieces) == 1 else b"".join(map(chunk, pieces))
        self.sent += 1
        last = self.left is not None and self.sent == self.left
        self.conn.transport.write(data + LAST_CHUNK if last else data)
        if last:
            self._end(True)
            self.conn.finished()

    def abort(self) -> None:
        self._end(False)

    def _end(self, completed: bool) -> None:
        if not self.over:
            self.over = True
            self.ended(completed)


class Engine:
    """Writes the unpaced streams: one step each whose reader keeps up, then one loop turn."""

    def __init__(self) -> None:
        self.active: list[Stream] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def add(self, stream: Stream) -> None:
        self.active.append(stream)
        self.wake.set()
        if self.task is None:
            self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        while True:
            running, self.active = self.active, []
            stepped = False
            for stream in running:
                if not stream.over and not stream.conn.paused:
                    stream.step()
                    stepped = True
                if not stream.over:
                    self.active.append(stream)
            if stepped:
                await asyncio.sleep(0)
            else:  # nothing to write, or every reader is behind: sleep until that changes
                self.wake.clear()
                await self.wake.wait()


async def paced(stream: Stream, interval: float) -> None:
    """Step k at start + k * interval (later only when the reader is behind)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not stream.over:
        await stream.conn.writable()
        if stream.over:
            return
        stream.step()
        await asyncio.sleep(max(0.0, start + stream.sent * interval - loop.time()))


class Server:
    """`app` served on a socket bound beforehand (so the port is taken before listening)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.engine = Engine()
        self._paced: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def pace(self, stream: Stream, interval: float) -> None:
        task = asyncio.ensure_future(paced(stream, interval))
        self._paced.add(task)
        task.add_done_callback(self._paced.discard)

    async def listen(self, sock: socket.socket) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)


class Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, one request at a time."""

    transport: asyncio.WriteTransport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = bytearray()
        self.busy = False  # an answer is in progress
        self.closed = False
        self.paused = False
        self.keep_alive = True
        self.abort: Callable[[], None] | None = None  # undoes the answer in progress
        self._resumed = asyncio.Event()
        self._resumed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.app.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._resumed.set()
        self.server.engine.wake.set()
        if self.abort is not None:
            abort, self.abort = self.abort, None
            abort()
        self.server.app.closed(self)

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()
        self.server.engine.wake.set()

    async def writable(self) -> None:
        await self._resumed.wait()

    @property
    def peer(self) -> str:
        host, port = (self.transport.get_extra_info("peername") or ("-", 0))[:2]
        return f"{host}:{port}"

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self.busy and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip()
                       for name, _, value in (line.partition(":") for line in lines[1:])}
            total = end + 4 + int(headers.get("content-length") or 0)
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
            del self.buffer[:total]
            method, target = lines[0].split(" ")[:2]
            self.keep_alive = headers.get("connection", "").lower() != "close"
            self.busy = True
            self.server.app.handle(self, Request(method, target, headers, body))

    def respond(self, status: int, data: bytes, content_type: bytes | None) -> None:
        """A whole answer at once."""
        self.transport.write(head(status, content_type, len(data)) + data)
        self.finished()

    def stream(self, steps: Iterator[list[bytes]], count: int | None, interval: float,
               ended: Callable[[bool], None]) -> None:
        """A 200 `text/event-stream`, written by the engine or, with an interval, paced."""
        self.transport.write(head(200, EVENT_STREAM, None))
        stream = Stream(self, steps, count, ended)
        self.abort = stream.abort
        if interval > 0:
            self.server.pace(stream, interval)
        else:
            self.server.engine.add(stream)

    def finished(self) -> None:
        """The answer in progress is complete: on to the next request."""
        self.abort = None
        self.busy = False
        if not self.keep_alive:
            self.transport.close()
        elif not self.closed:
            self._serve_buffered()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (it is faster), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
