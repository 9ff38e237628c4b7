"""A fast stand-in for vLLM's chat route, for load and leak tests: raw asyncio HTTP/1.1.

Usage: python fast_upstream.py --port P   (loopback only; prints `listening` when ready)

fake_vllm.py speaks the protocol faithfully but spends a thread and a flush per event;
this one writes hundreds of streams at once from one event loop, so it is never what
a load test measures. Every body it sends is a pure function of the request
(`stream_body`, `json_body`), so a test can rebuild exactly what was sent and compare.

`POST /v1/chat/completions` (any other path: 404), request fields read only here:
- `"stream": true` with `load_stream` (an id) and `load_events` (how many content
  events): chunked `text/event-stream`, the bytes of `stream_body(...)` written in
  pieces of `load_piece` bytes (default 16381) that cut events and UTF-8 characters
  anywhere, honouring TCP back-pressure; `load_text: "multibyte"` fills each event with
  `load_event_chars` characters of 1- to 4-byte UTF-8; `load_events: 0` streams one
  event every 10 ms until the client goes away;
- otherwise: `json_body(load_body_bytes)`, one JSON object of about that many bytes,
  with the SHA-256 of the first message's content as received (to check request bodies).

`GET /stats`: what the server has seen, as JSON: `connections` (open now, besides the
one asking), `streams` (open now), `peak_streams`, `requests` (to the chat route),
`streams_done`, `streams_aborted`.
`POST /stats/reset` zeroes the peaks and counters (not what is open).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
from typing import Any

MULTIBYTE = "aé€😀ß中ü🙂Ωж"  # 1, 2, 3 and 4 bytes in UTF-8
ENDLESS_INTERVAL = 0.01


def compact(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def event_text(stream: int, index: int, kind: str = "ascii", chars: int = 0) -> str:
    """The content of one event: unique per stream and index, so reordering shows."""
    if kind == "multibyte":
        body = "".join(MULTIBYTE[(stream + index + k) % len(MULTIBYTE)] for k in range(chars))
        return f"{stream}.{index}:{body}"
    return f"{stream}.{index} "


def event(stream: int, index: int, kind: str = "ascii", chars: int = 0) -> bytes:
    delta = {"content": event_text(stream, index, kind, chars)}
    return b"data: " + compact({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


def stream_body(stream: int, events: int, kind: str = "ascii", chars: int = 0) -> bytes:
    """Exactly what a finite stream sends: its events, then `[DONE]`."""
    return b"".join(event(stream, i, kind, chars) for i in range(events)) + b"data: [DONE]\n\n"


def json_body(size: int, received_sha256: str = "") -> bytes:
    """A chat.completion holding at least `size` bytes of multi-byte text."""
    unit = MULTIBYTE * 8
    text = unit * (size // len(unit.encode()) + 1)
    payload = {"id": "chatcmpl-load", "object": "chat.completion",
               "received_sha256": received_sha256,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": "length"}]}
    return compact(payload)


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.streams = 0
        self.reset()

    def reset(self) -> None:
        self.peak_streams = self.streams
        self.requests = 0
        self.streams_done = 0
        self.streams_aborted = 0

    def view(self) -> dict[str, int]:
        """The counters, as seen by a client asking over a connection of its own."""
        return {"connections": self.connections - 1, "streams": self.streams,
                "peak_streams": self.peak_streams, "requests": self.requests,
                "streams_done": self.streams_done, "streams_aborted": self.streams_aborted}


STATS = Stats()


def head(status: int, content_type: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 400: b"Bad Request"}[status]
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: " + content_type]
    lines.append(b"transfer-encoding: chunked" if length is None else b"content-length: %d"
                 % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Connection(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time; streams run as tasks."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.busy = False
        self.closed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        STATS.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        STATS.connections -= 1
        self.closed.set()
        self.writable.set()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self.busy and not self.closed.is_set():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            total = end + 4 + int(headers.get("content-length") or 0)
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
            del self.buffer[:total]
            method, path = lines[0].split(" ")[:2]
            self.busy = True
            self._dispatch(method, path, body)

    def _done(self) -> None:
        self.busy = False
        self._serve()

    def _json(self, status: int, data: bytes) -> None:
        self.transport.write(head(status, b"application/json", len(data)) + data)
        self._done()

    def _dispatch(self, method: str, path: str, raw: bytes) -> None:
        if method == "GET" and path == "/stats":
            self._json(200, compact(STATS.view()))
            return
        if method == "POST" and path == "/stats/reset":
            STATS.reset()
            self._json(200, b"{}")
            return
        if method != "POST" or path != "/v1/chat/completions":
            self._json(404, b'{"detail":"Not Found"}')
            return
        STATS.requests += 1
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._json(400, b'{"error":{"message":"not a JSON object","code":400}}')
            return
        if not body.get("stream"):
            messages = body.get("messages") or [{}]
            content = str(messages[0].get("content", "")) if isinstance(messages[0], dict) else ""
            digest = hashlib.sha256(content.encode()).hexdigest()
            self._json(200, json_body(int(body.get("load_body_bytes") or 100), digest))
            return
        self.transport.write(head(200, b"text/event-stream; charset=utf-8", None))
        self.task = asyncio.ensure_future(self._stream(body))

    async def _write(self, data: bytes) -> None:
        await self.writable.wait()
        if self.closed.is_set():
            raise ConnectionError("client gone")
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def _stream(self, body: dict[str, Any]) -> None:
        STATS.streams += 1
        STATS.peak_streams = max(STATS.peak_streams, STATS.streams)
        stream, events = int(body.get("load_stream") or 0), int(body.get("load_events") or 0)
        try:
            if events == 0:
                index = 0
                while True:
                    await self._write(event(stream, index))
                    index += 1
                    await asyncio.sleep(ENDLESS_INTERVAL)
            data = stream_body(stream, events, str(body.get("load_text") or "ascii"),
                               int(body.get("load_event_chars") or 0))
            piece = int(body.get("load_piece") or 16381)
            for start in range(0, len(data), piece):
                await self._write(data[start:start + piece])
                await asyncio.sleep(0)  # let every other stream write too
            self.transport.write(b"0\r\n\r\n")
            STATS.streams_done += 1
            self.task = None
            self._done()
        except (asyncio.CancelledError, ConnectionError):
            STATS.streams_aborted += 1
        finally:
            STATS.streams -= 1


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Connection, "127.0.0.1", port, backlog=2048)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(parser.parse_args().port))
    else:
        uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
