"""Keep N streams open for as long as a measurement lasts, read as cheaply as Python can.

Scenario 11 needs a client that costs little next to the relay it measures (it shares a core
with the stand-in vLLM, never the worker's), that counts every event, times the gaps
between a stream's events and proves, stream by stream, that every byte arrived:

- `HttpStreams`: `streams` keep-alive HTTP/1.1 connections, each sending a streamed chat
  completion as soon as its previous one ended, answers parsed by httptools (llhttp, C),
  each piece of body counted and hashed where it lands (no httpx, no per-event objects);
- `QueueStreams`: the queue path's "client", the fake Runpod platform (fakes.platform),
  kept `streams` jobs full: each job-done queues the next job, and the stream posts each
  job received are read back once the load ends (so reading them costs nothing during it).

Both feed a `Tally`: events, pieces and the gaps between a stream's events inside the
measured window (`start`..`end`: the events of one piece arrive together, so all but its
first count a gap of 0), and each finished stream's byte count and SHA-256 by its chat id,
to compare with what the stand-in says it wrote (`bench_digest`, `GET /digests`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from array import array
from typing import Any
from urllib.parse import urlsplit

import httptools

from benchmarks.paths import CHAT_PATH, HELLO
from fakes.platform import Platform

ID_MARK = b'"id":"'


def lengths(seed: int, low: int, high: int) -> random.Random:
    """The stream lengths' source: the same sequence for every path of a round."""
    return random.Random(f"{seed}:{low}:{high}")


def chat_body(tokens: int, model: str | None) -> dict[str, Any]:
    """vLLM's chat request, streamed with usage, its bytes digested by the stand-in."""
    body: dict[str, Any] = {"messages": HELLO, "max_tokens": tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "bench_digest": True}
    return {"model": model, **body} if model else body


class Stream:
    """One stream as it arrives: its name (the chat id), bytes, hash and last event's time."""

    __slots__ = ("head", "last", "pending", "sha", "size")

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.last: float | None = None
        self.pending = False  # the last piece ended in one newline of an event's two

    def name(self) -> str:
        start = self.head.find(ID_MARK) + len(ID_MARK)
        return self.head[start:self.head.find(b'"', start)].decode("ascii", "replace")


class Tally:
    """What arrived, over the measured window (`start`, `end`) and in all."""

    def __init__(self) -> None:
        self.start = float("inf")
        self.end = float("inf")
        self.events = 0  # inside the window
        self.pieces = 0  # pieces that brought at least one event, inside the window
        self.gaps = array("d")  # each such piece's gap since the stream's previous event
        self.zeros = 0  # the events after the first of a piece: no gap
        self.received: dict[str, tuple[int, str]] = {}  # chat id -> bytes, SHA-256
        self.errors: list[str] = []

    def piece(self, stream: Stream, now: float, data: bytes) -> None:
        stream.sha.update(data)
        stream.size += len(data)
        if len(stream.head) < 64:
            stream.head += data[:64]
        events = data.count(b"\n\n") + (stream.pending and data[:1] == b"\n")
        stream.pending = data[-1:] == b"\n" and data[-2:] != b"\n\n"
        if not events:
            return
        if self.start <= now < self.end:
            self.events += events
            self.pieces += 1
            self.zeros += events - 1
            if stream.last is not None:
                self.gaps.append(now - stream.last)
        stream.last = now

    def ended(self, stream: Stream) -> None:
        self.received[stream.name()] = (stream.size, stream.sha.hexdigest())

    def gap_quantile(self, fraction: float, deliveries: bool = False) -> float:
        """The `fraction` quantile of the gaps between a stream's events (seconds), or with
        `deliveries` between its pieces (the events after a piece's first left out)."""
        zeros = 0 if deliveries else self.zeros
        total = len(self.gaps) + zeros
        if total == 0:
            return float("nan")
        rank = min(total - 1, int(fraction * total))
        return 0.0 if rank < zeros else sorted(self.gaps)[rank - zeros]


class _Slot(asyncio.Protocol):
    """One connection: a streamed request, then the next, until the load stops."""

    def __init__(self, load: HttpStreams, done: asyncio.Future[None]) -> None:
        self.load, self.done = load, done
        self.parser = httptools.HttpResponseParser(self)
        self.stream = Stream()
        self.now = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.load.request())

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"not HTTP: {exc}")

    def on_headers_complete(self) -> None:
        if (status := self.parser.get_status_code()) != 200:
            self._fail(f"status {status}")

    def on_body(self, body: bytes) -> None:
        self.load.tally.piece(self.stream, self.now, body)

    def on_message_complete(self) -> None:
        self.load.tally.ended(self.stream)
        self.stream = Stream()
        if self.load.running:
            self.transport.write(self.load.request())
        else:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._fail(f"connection lost in a stream ({exc or 'closed'})")

    def _fail(self, why: str) -> None:
        self.load.tally.errors.append(why)
        self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class HttpStreams:
    """`streams` connections to `url`'s host, each streaming chat completions from `path`
    back to back (module docstring); `await stop()` ends each after its current stream."""

    def __init__(self, url: str, path: str, model: str | None, streams: int,
                 sizes: random.Random, low: int, high: int) -> None:
        where = urlsplit(url)
        self.host, self.port = where.hostname or "127.0.0.1", where.port or 80
        self.path, self.model, self.streams = path, model, streams
        self.sizes, self.low, self.high = sizes, low, high
        self.tally = Tally()
        self.running = True
        self.sent = 0
        self._done: list[asyncio.Future[None]] = []

    def request(self) -> bytes:
        # The first stream of each slot ends anywhere in the range, so that the streams
        # do not all end and start again at once.
        low = 1 if self.sent < self.streams else self.low
        self.sent += 1
        body = json.dumps(chat_body(self.sizes.randint(low, self.high), self.model)).encode()
        return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s"
                % (self.path.encode(), self.host.encode(), self.port, len(body), body))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.streams):
            done: asyncio.Future[None] = loop.create_future()
            self._done.append(done)
            await loop.create_connection(lambda d=done: _Slot(self, d), self.host, self.port)

    async def stop(self, timeout: float) -> None:
        self.running = False
        await asyncio.wait_for(asyncio.gather(*self._done), timeout)


class QueueStreams:
    """The queue path's client: `platform` kept `streams` jobs full (module docstring).
    Make it before the platform, which takes its `job_done` as `on_done`."""

    def __init__(self, streams: int, sizes: random.Random, low: int, high: int) -> None:
        self.streams, self.sizes, self.low, self.high = streams, sizes, low, high
        self.tally = Tally()
        self.platform: Platform | None = None
        self.running = False
        self._lock = threading.Lock()
        self._open = 0
        self._idle = threading.Event()
        self._done: list[str] = []

    def _queue(self, first: bool) -> None:
        assert self.platform is not None
        tokens = self.sizes.randint(1 if first else self.low, self.high)
        self.platform.queue_job({"openai_route": CHAT_PATH,
                                 "openai_input": chat_body(tokens, None)})

    def job_done(self, job_id: str) -> None:
        """The platform's `on_done`: the next job, while the load runs."""
        with self._lock:
            self._done.append(job_id)
            if self.running:
                self._queue(first=False)
                return
            self._open -= 1
            if self._open == 0:
                self._idle.set()

    def start(self, platform: Platform) -> None:
        self.platform, self.running = platform, True
        self._idle.clear()
        with self._lock:
            self._open = self.streams
            for _ in range(self.streams):
                self._queue(first=True)

    async def stop(self, timeout: float) -> None:
        """Queue no more jobs, wait for those open to end, then read what they posted."""
        with self._lock:
            self.running = False
        if not await asyncio.to_thread(self._idle.wait, timeout):
            raise RuntimeError(f"{self._open} jobs did not end within {timeout:g} s")
        assert self.platform is not None
        for job_id in self._done:
            finished = self.platform.finished(job_id)
            if "output" not in finished.result:
                self.tally.errors.append(f"job {job_id}: {str(finished.result)[:300]}")
                continue
            stream = Stream()
            for posted, arrived in zip(finished.streams, finished.stream_times, strict=True):
                self.tally.piece(stream, arrived, str(posted.get("output", "")).encode())
            self.tally.ended(stream)
        self._done.clear()
