"""A stand-in for vLLM's OpenAI server, fast enough never to be the bottleneck.

Usage: python benchmarks/upstream.py --port P [--served-model-name N] [any vLLM flag, ignored]
It takes the argv the worker builds for vLLM, so it can also run as the worker's child
(through a VLLM_PYTHON launcher). Standard library only (uvloop when installed).

Wire format, as vLLM 0.32 sends it (observed on the CPU build):
- uvicorn's headers (`date`, `server: uvicorn`, `content-type`, `vary: Origin`);
- `GET /health`: 200, empty; `GET /v1/models`: the model list;
- `POST /v1/chat/completions`: a `chat.completion` body, or with `"stream": true`
  HTTP/1.1 chunked `text/event-stream`, one SSE event per HTTP chunk: the role chunk
  and the first token written together, one chunk per token (the last with
  `finish_reason`), the usage chunk (`"choices": []`) when
  `stream_options.include_usage` is set, then `data: [DONE]`. Compact JSON, as pydantic
  writes it. Any other path: FastAPI's 404 `{"detail": "Not Found"}`.

Request fields read only here (vLLM would ignore them):
- `max_tokens`: content chunks to send (default 16);
- `bench_token_interval`: seconds between tokens; 0 (default) is as fast as possible;
- `bench_stamp`: each token's content is the CLOCK_MONOTONIC time it was written (taken
  before the write; token 0's is taken before the role chunk), so a reader on this
  machine can tell how long every event waited downstream.

Unpaced streams are written by one engine loop: each step writes the next event of
every stream whose socket takes more, then lets the event loop run once, as vLLM emits
one token per running request per engine step. Writes respect TCP back-pressure.

Environment: BENCH_UPSTREAM_HEALTHY_AFTER=<s> binds the port but listens only after
that many seconds (connections are refused meanwhile, as with vLLM loading);
BENCH_UPSTREAM_REPORT=<file> receives `{"pid", "started", "listening"}` (times in
monotonic seconds; `started` is the process's start, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import os
import socket
import time
from typing import Any

FIRST_TOKEN_CONTENT = "tok "
DEFAULT_TOKENS = 16
PACED: set[asyncio.Future[None]] = set()  # running paced streams (the loop keeps weak refs)


def compact(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(payload: bytes) -> bytes:
    return chunk(b"data: " + payload + b"\n\n")


class Clock:
    """uvicorn's `date` header, formatted once a second."""

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
    """The status line and headers, in uvicorn's order."""
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"date: " + CLOCK.date(), b"server: uvicorn"]
    if length is not None:
        lines.append(b"content-length: %d" % length)
    if content_type is not None:
        lines.append(b"content-type: " + content_type)
    lines.append(b"vary: Origin")
    if length is None:
        lines.append(b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def completion(request_id: str, created: int, model: str, tokens: int) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": FIRST_TOKEN_CONTENT * tokens, "refusal": None,
            "annotations": None, "audio": None, "function_call": None, "reasoning": None},
            "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "token_ids": None, "routed_experts": None}],
        "service_tier": None, "system_fingerprint": "vllm-0.32.0-stand-in",
        "usage": {"prompt_tokens": 10, "total_tokens": 10 + tokens, "completion_tokens": tokens,
                  "prompt_tokens_details": None, "completion_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }


class Stream:
    """One streamed chat completion: its events, written one `step` at a time."""

    def __init__(self, conn: Connection, request_id: str, model: str, tokens: int,
                 usage: bool, stamp: bool) -> None:
        self.conn = conn
        self.tokens = tokens
        self.stamp = stamp
        self.sent = 0  # tokens written
        self.done = False
        created = int(time.time())
        prefix = (b'{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                  % (request_id.encode(), created, compact(model)))
        self.role = sse(prefix + b'"choices":[{"index":0,"delta":{"role":"assistant",'
                        b'"content":""},"logprobs":null,"finish_reason":null}],'
                        b'"prompt_token_ids":null,"prompt_text":null}')
        self._token_head = prefix + b'"choices":[{"index":0,"delta":{"content":'
        self._middle = sse(self._token(FIRST_TOKEN_CONTENT, last=False))
        self._last = sse(self._token(FIRST_TOKEN_CONTENT, last=True))
        self.tail = b""
        if usage:
            self.tail += sse(prefix + b'"choices":[],"usage":{"prompt_tokens":10,'
                             b'"total_tokens":%d,"completion_tokens":%d},'
                             b'"system_fingerprint":"vllm-0.32.0-stand-in"}'
                             % (10 + tokens, tokens))
        self.tail += sse(b"[DONE]")

    def _token(self, content: str, last: bool) -> bytes:
        end = (b'"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}'
               if last else b'"logprobs":null,"finish_reason":null,"token_ids":null}]}')
        return self._token_head + compact(content) + b"}," + end

    def step(self) -> None:
        """Write the next token (with the role chunk before the first, the tail after the last)."""
        write = self.conn.transport.write
        last = self.sent == self.tokens - 1
        if self.stamp:
            event = sse(self._token(f"{time.monotonic():.6f}", last))
        else:
            event = self._last if last else self._middle
        if self.sent == 0:
            write(self.role)
        write(event)
        self.sent += 1
        if last:
            write(self.tail)
            write(b"0\r\n\r\n")
            self.done = True
            self.conn.response_done()


class Engine:
    """Writes unpaced streams: one event per stream per step, then one turn of the loop."""

    def __init__(self) -> None:
        self.active: list[Stream] = []
        self.wake = asyncio.Event()

    def add(self, stream: Stream) -> None:
        self.active.append(stream)
        self.wake.set()

    async def run(self) -> None:
        while True:
            running, self.active = self.active, []
            stepped = False
            for stream in running:
                if stream.conn.closed:
                    continue
                if not stream.conn.paused:
                    stream.step()
                    stepped = True
                if not stream.done:
                    self.active.append(stream)
            if stepped:
                await asyncio.sleep(0)
            else:  # nothing to do, or every reader is behind: sleep until that changes
                self.wake.clear()
                await self.wake.wait()


async def paced(stream: Stream, interval: float) -> None:
    """Write token i at start + i * interval (the tail right after the last token)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not stream.done and not stream.conn.closed:
        await stream.conn.writable()
        stream.step()
        await asyncio.sleep(max(0.0, start + stream.sent * interval - loop.time()))


class Connection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; one request at a time (clients do not pipeline)."""

    engine: Engine
    model = "stand-in"
    root = "stand-in"
    ids = 0

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._resumed.set()
        self.engine.wake.set()

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()
        self.engine.wake.set()

    async def writable(self) -> None:
        await self._resumed.wait()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve_buffered()

    def response_done(self) -> None:
        self.busy = False
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self.busy and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            total = end + 4 + int(headers.get("content-length") or 0)
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
            del self.buffer[:total]
            method, path = lines[0].split(" ")[:2]
            self.busy = True
            self._dispatch(method, path, body)

    def _json(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else compact(payload)
        kind = None if payload is None else b"application/json"
        self.transport.write(head(status, kind, len(data)) + data)
        self.response_done()

    def _dispatch(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/health":
            self._json(200, None)
        elif method == "GET" and path == "/v1/models":
            now = int(time.time())
            self._json(200, {"object": "list", "data": [{
                "id": self.model, "object": "model", "created": now, "owned_by": "vllm",
                "root": self.root, "parent": None, "max_model_len": 8192, "permission": []}]})
        elif method == "POST" and path == "/v1/chat/completions":
            self._chat(body)
        else:
            self._json(404, {"detail": "Not Found"})

    def _chat(self, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._json(400, {"error": {"message": "messages: field required",
                                       "type": "BadRequestError", "param": None, "code": 400}})
            return
        if body.get("model") != self.model:
            self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not "
                                                  "exist.", "type": "NotFoundError",
                                       "param": "model", "code": 404}})
            return
        Connection.ids += 1
        request_id = f"chatcmpl-{Connection.ids:016x}"
        tokens = max(1, int(body.get("max_tokens") or DEFAULT_TOKENS))
        if not body.get("stream"):
            self._json(200, completion(request_id, int(time.time()), self.model, tokens))
            return
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = Stream(self, request_id, self.model, tokens, usage, bool(body.get("bench_stamp")))
        self.transport.write(head(200, b"text/event-stream; charset=utf-8", None))
        interval = float(body.get("bench_token_interval") or 0)
        if interval > 0:
            task = asyncio.ensure_future(paced(stream, interval))
            PACED.add(task)
            task.add_done_callback(PACED.discard)
        else:
            self.engine.add(stream)


def process_start() -> float:
    """This process's start on the monotonic clock (10 ms resolution, from /proc)."""
    with open("/proc/self/stat", "rb") as stat:
        ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


async def serve(host: str, port: int, healthy_after: float, report: str | None) -> None:
    started = process_start()
    loop = asyncio.get_running_loop()
    Connection.engine = Engine()
    engine = asyncio.ensure_future(Connection.engine.run())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    await asyncio.sleep(max(0.0, started + healthy_after - time.monotonic()))
    server = await loop.create_server(Connection, sock=sock, backlog=1024)
    listening = time.monotonic()
    if report:
        with open(f"{report}.tmp", "w", encoding="utf-8") as out:
            json.dump({"pid": os.getpid(), "started": started, "listening": listening}, out)
        os.replace(f"{report}.tmp", report)
    print(f"stand-in upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()
    engine.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", default="stand-in")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", dest="served_model_name")
    args, _ignored = parser.parse_known_args()
    Connection.model = args.served_model_name or args.model
    Connection.root = args.model
    healthy_after = float(os.environ.get("BENCH_UPSTREAM_HEALTHY_AFTER") or 0)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, healthy_after, os.environ.get("BENCH_UPSTREAM_REPORT")))


if __name__ == "__main__":
    main()
