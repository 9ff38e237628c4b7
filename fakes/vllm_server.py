"""What the stand-in vLLM answers: its routes, the load tests' fields and the switches.

fakes.vllm documents all of it (the wire format, every request field and switch) and runs
the process; this module is the `App` that fakes.http serves, kept apart so that each
module stays short.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fakes import bodies
from fakes.http import REASONS, App, Connection, Request

VLLM_ROUTES = ("/health", "/openapi.json", "/v1/models", "/v1/chat/completions")
Digest = list[Any]  # [bytes, sha256 hex, completed]: what `GET /digests` shows per stream
DEFAULT_TOKENS = 5
DEFAULT_PIECE = 16381
ENDLESS_INTERVAL = 0.01


def say(text: str) -> None:
    """One line on stdout, flushed at once (the worker reads it through a pipe)."""
    print(text, flush=True)


def write_atomically(path: str, text: str) -> None:
    """Readers never see the file half-written."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(f"{path}.tmp", path)


@dataclass(frozen=True)
class Switches:
    """The FAKE_VLLM_* variables, read once at start (see the module's docstring)."""

    healthy_after: float = 0.0
    never_healthy: bool = False
    exit_after: float | None = None
    exit_code: int = 1
    ignore_sigterm: bool = False
    grandchild: str = ""
    token_delay: float = 0.0
    answer_delay: float = 0.0
    record: str = ""
    pid_file: str = ""
    argv_file: str = ""
    print_env: str = ""
    print_argv: bool = False
    peak_file: str = ""
    report: str = ""

    @classmethod
    def read(cls, env: Mapping[str, str]) -> Switches:
        def get(name: str) -> str:
            return env.get(f"FAKE_VLLM_{name}") or ""

        return cls(
            healthy_after=float(get("HEALTHY_AFTER") or 0),
            never_healthy=get("NEVER_HEALTHY") == "1",
            exit_after=float(get("EXIT_AFTER")) if get("EXIT_AFTER") else None,
            exit_code=int(get("EXIT_CODE") or 1),
            ignore_sigterm=get("IGNORE_SIGTERM") == "1",
            grandchild=get("GRANDCHILD"),
            token_delay=float(get("TOKEN_DELAY") or 0),
            answer_delay=float(get("ANSWER_DELAY") or 0),
            record=get("RECORD"),
            pid_file=get("PID_FILE"),
            argv_file=get("ARGV_FILE"),
            print_env=get("PRINT_ENV"),
            print_argv=get("PRINT_ARGV") == "1",
            peak_file=get("PEAK_FILE"),
            report=get("REPORT"))


@dataclass
class Stats:
    """What `/stats` shows, and the chat completions in progress (FAKE_VLLM_PEAK_FILE)."""

    connections: int = 0
    streams: int = 0
    peak_streams: int = 0
    requests: int = 0
    streams_done: int = 0
    streams_aborted: int = 0
    answers_aborted: int = 0
    serving: int = field(default=0, repr=False)
    peak_serving: int = field(default=0, repr=False)

    def reset(self) -> None:
        self.peak_streams = self.streams
        self.requests = self.streams_done = self.streams_aborted = self.answers_aborted = 0

    def view(self) -> dict[str, int]:
        """The counters, as seen by a client asking over a connection of its own."""
        return {"connections": self.connections - 1, "streams": self.streams,
                "peak_streams": self.peak_streams, "requests": self.requests,
                "streams_done": self.streams_done, "streams_aborted": self.streams_aborted,
                "serving": self.serving, "answers_aborted": self.answers_aborted}


def parsed(request: Request) -> Any:
    """The request body as JSON, else as text; None for a GET."""
    if request.method == "GET":
        return None
    try:
        return json.loads(request.body)
    except ValueError:
        return request.body.decode("utf-8", errors="replace")


class StandIn(App):
    """vLLM's routes, the load tests' fields and the switches, over fakes.http."""

    def __init__(self, served: str, root: str, switches: Switches, access_log: bool,
                 api_key: str | None = None, adapters: dict[str, str] | None = None,
                 runtime_lora: bool = False) -> None:
        self.served, self.root, self.switches = served, root, switches
        self.api_key = api_key
        self.adapters = dict(adapters or {})  # LoRA adapters served besides: name -> path
        self.access_log = access_log
        self.stats = Stats()
        self.ids = itertools.count(1)
        self.digests: dict[str, Digest] = {}  # ended `bench_digest` streams, not yet asked for
        self.routes = {("GET", "/health"): self.health, ("GET", "/openapi.json"): self.openapi,
                       ("GET", "/v1/models"): self.models, ("GET", "/stats"): self.view,
                       ("GET", "/digests"): self.hand_out_digests,
                       ("POST", "/stats/reset"): self.reset,
                       ("POST", "/v1/chat/completions"): self.chat}
        if runtime_lora:  # as vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
            self.routes[("POST", "/v1/load_lora_adapter")] = self.load_lora

    def opened(self, conn: Connection) -> None:
        self.stats.connections += 1

    def closed(self, conn: Connection) -> None:
        self.stats.connections -= 1

    def handle(self, conn: Connection, request: Request) -> None:
        if (self.api_key and request.path.startswith("/v1")
                and request.headers.get("authorization") != f"Bearer {self.api_key}"):
            self.answer(conn, request, 401, b'{"error":"Unauthorized"}')  # as vLLM's --api-key
            return
        self.routes.get((request.method, request.path), self.not_found)(conn, request)

    # ------------------------------------------------------------ answering --
    def started(self, conn: Connection, request: Request, status: int) -> None:
        """uvicorn's access line, when the answer starts."""
        if self.access_log:
            say(f'INFO:     {conn.peer} - "{request.method} {request.target} HTTP/1.1" '
                f"{status} {REASONS[status].decode()}")

    def answer(self, conn: Connection, request: Request, status: int, data: bytes,
               content_type: bytes | None = b"application/json") -> None:
        self.started(conn, request, status)
        conn.respond(status, data, content_type)
        self.record(request, status, data)

    def record(self, request: Request, status: int, response: bytes) -> None:
        if self.switches.record:
            entry = {"method": request.method, "path": request.target, "body": parsed(request),
                     "status": status,
                     "response": response.decode("utf-8", errors="surrogateescape")}
            with open(self.switches.record, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    def count_serving(self, change: int) -> None:
        """Chat completions in progress; a new peak goes to FAKE_VLLM_PEAK_FILE."""
        stats = self.stats
        stats.serving += change
        if stats.serving > stats.peak_serving:
            stats.peak_serving = stats.serving
            if self.switches.peak_file:
                write_atomically(self.switches.peak_file, str(stats.peak_serving))

    # --------------------------------------------------------------- routes --
    def health(self, conn: Connection, request: Request) -> None:
        self.answer(conn, request, 503 if self.switches.never_healthy else 200, b"", None)

    def openapi(self, conn: Connection, request: Request) -> None:
        self.answer(conn, request, 200, bodies.openapi(VLLM_ROUTES))

    def models(self, conn: Connection, request: Request) -> None:
        self.answer(conn, request, 200, bodies.models(self.served, self.root, self.adapters))

    def load_lora(self, conn: Connection, request: Request) -> None:
        body = parsed(request)
        name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(
            body, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str):
            self.answer(conn, request, 400, bodies.error(
                400, "lora_name and lora_path are required", "BadRequestError"))
        elif name in self.adapters:
            self.answer(conn, request, 400, bodies.error(
                400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"))
        else:
            self.adapters[name] = path
            self.answer(conn, request, 200,
                        f"Success: LoRA adapter '{name}' added successfully.".encode(),
                        b"text/plain; charset=utf-8")

    def view(self, conn: Connection, request: Request) -> None:
        self.answer(conn, request, 200, bodies.compact(self.stats.view()))

    def hand_out_digests(self, conn: Connection, request: Request) -> None:
        given, self.digests = self.digests, {}
        self.answer(conn, request, 200, bodies.compact(given))

    def reset(self, conn: Connection, request: Request) -> None:
        self.stats.reset()
        self.answer(conn, request, 200, b"{}")

    def not_found(self, conn: Connection, request: Request) -> None:
        self.answer(conn, request, 404, b'{"detail":"Not Found"}')

    def chat(self, conn: Connection, request: Request) -> None:
        self.stats.requests += 1
        body = parsed(request)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self.answer(conn, request, 400, bodies.error(400, "messages: field required",
                                                         "BadRequestError"))
        elif body.get("model") != self.served and body.get("model") not in self.adapters:
            self.answer(conn, request, 404, bodies.error(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError",
                "model"))
        else:
            self.count_serving(+1)
            (self.stream if body.get("stream") else self.complete)(conn, request, body)

    def complete(self, conn: Connection, request: Request, body: dict[str, Any]) -> None:
        if "load_body_bytes" in body:
            first = (body["messages"] or [{}])[0]
            text = str(first.get("content", "")) if isinstance(first, dict) else ""
            data = bodies.json_body(int(body["load_body_bytes"] or 100),
                                    hashlib.sha256(text.encode()).hexdigest())
        else:
            data = bodies.completion(f"chatcmpl-{next(self.ids):016x}", body["model"],
                                     int(body.get("max_tokens") or DEFAULT_TOKENS))

        def send() -> None:
            self.count_serving(-1)
            self.answer(conn, request, 200, data)

        if not (delay := float(body.get("bench_answer_delay") or self.switches.answer_delay)):
            send()
            return
        say(f"INFO fake vllm: answering in {delay:g} s")
        timer = asyncio.get_running_loop().call_later(delay, send)

        def abort() -> None:
            timer.cancel()
            self.count_serving(-1)
            self.stats.answers_aborted += 1
            say("INFO fake vllm: client went away; aborting the request")

        conn.abort = abort

    def stream(self, conn: Connection, request: Request, body: dict[str, Any]) -> None:
        name, steps, count = self.steps(body)
        digest = Digester() if body.get("bench_digest") else None
        if digest is not None:
            steps = digest.hashing(steps)
        interval = float(body.get("bench_token_interval") or self.switches.token_delay)
        if count is None:
            interval = interval or ENDLESS_INTERVAL
        sent: list[bytes] = []
        if self.switches.record:
            steps = kept(steps, sent)
        stats = self.stats
        stats.streams += 1
        stats.peak_streams = max(stats.peak_streams, stats.streams)

        def ended(completed: bool) -> None:
            stats.streams -= 1
            if completed:
                stats.streams_done += 1
            else:
                stats.streams_aborted += 1
                say("INFO fake vllm: client went away; aborting the request")
            self.count_serving(-1)
            self.record(request, 200, b"".join(sent))
            if digest is not None:
                self.digests[name] = [digest.size, digest.sha.hexdigest(), completed]

        self.started(conn, request, 200)
        conn.stream(steps, count, interval, ended)

    def steps(self, body: dict[str, Any]) -> tuple[str, Iterator[list[bytes]], int | None]:
        """A stream's name (its chat id, or `load-<stream>`), its steps and how many (None:
        endless), for vLLM's events or a load's."""
        if "load_events" not in body:
            tokens = max(1, int(body.get("max_tokens") or DEFAULT_TOKENS))
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            name = f"chatcmpl-{next(self.ids):016x}"
            return name, bodies.chat_steps(name, body["model"], tokens, usage,
                                           bool(body.get("bench_stamp"))), tokens
        stream, events = int(body.get("load_stream") or 0), int(body["load_events"] or 0)
        if events == 0:
            return (f"load-{stream}", ([bodies.event(stream, index)]
                                       for index in itertools.count()), None)
        data = bodies.stream_body(stream, events, str(body.get("load_text") or "ascii"),
                                  int(body.get("load_event_chars") or 0))
        piece = int(body.get("load_piece") or DEFAULT_PIECE)
        starts = range(0, len(data), piece)
        return f"load-{stream}", ([data[start:start + piece]] for start in starts), len(starts)


def kept(steps: Iterator[list[bytes]], sent: list[bytes]) -> Iterator[list[bytes]]:
    """`steps`, keeping every piece written in `sent` (for FAKE_VLLM_RECORD)."""
    for pieces in steps:
        sent.extend(pieces)
        yield pieces



class Digester:
    """The byte count and SHA-256 of what a stream wrote (for `bench_digest`)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def hashing(self, steps: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        """`steps`, each piece hashed and counted as it is written."""
        for pieces in steps:
            for piece in pieces:
                self.sha.update(piece)
                self.size += len(piece)
            yield pieces
