"""A stand-in for Runpod's job API, for the worker run as deployments run it (`python handler.py`).

It serves, under `/v2/test-endpoint` and for one worker id, what the Runpod SDK (1.12)
calls, with the URL templates `env()` hands to the worker:

- `GET job-take/<worker>`: a short long-poll, like the real one, so the SDK neither spins
  nor waits: a queued job at once (`{"id", "input"}`), else 204 after `poll` seconds;
- `GET job-take-batch/<worker>?batch_size=N`: the same, answering a list of up to N jobs
  (the SDK's form with a concurrency above 1);
- `GET job-stop/<worker>`: 204, no job to stop;
- `GET ping/<worker>?job_id=...&runpod_version=...`: the heartbeat, answered `{}`;
- `POST job-stream/<worker>/<job>` and `POST job-done/<worker>/<job>` (`isStream` in the
  query): the SDK posts JSON text as a form-encoded body; both are parsed and kept.

Everything it receives is kept in `received` (URL, headers, body: to search for leaked
secrets), unless `keep_received=False` (a benchmark's hundreds of megabytes of posts).
Anything else (another path, method or worker id) is answered 404 and kept in
`unexpected`, a handler that raises answers 500 and is kept in `errors`: `check()` fails on
either, as pytest-httpserver's `check()` did, so fixtures call it at teardown.

Why threads (the standard library's ThreadingHTTPServer, in a background thread): a
long-poll or a held stream post simply blocks its own thread, and waiting for what the
platform received is a plain `threading.Condition` wait that tests call as they are and
benchmarks through `asyncio.to_thread`; the SDK sends a few requests per job, far from
what would make threads the bottleneck. A benchmark that keeps jobs coming for as long as
it runs passes `on_done`, called with each job's id once its result is kept (in the
connection's thread, outside the lock: it may queue the next job), and takes each
finished job's posts back with `finished`, so that nothing piles up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

WORKER_ID = "test-worker"
PREFIX = "/v2/test-endpoint"
ROUTE = re.compile(rf"^{PREFIX}/(?P<kind>job-take|job-take-batch|job-stop|ping|job-stream"
                   rf"|job-done)/{WORKER_ID}(?:/(?P<job>[\w-]+))?$")
POSTED = ("job-stream", "job-done")  # the kinds that are POSTed, and name a job
_job_ids = itertools.count(1)  # unique across platforms, so a session never reuses one

Reply = tuple[int, Any]  # status, and a JSON payload (None: no body)


@dataclass
class Finished:
    """What the platform received for one job: each stream post's payload and the
    time.monotonic() it arrived at, and the job-done payload."""

    streams: list[Any]
    stream_times: list[float]
    result: dict[str, Any]


class WaitTimeout(AssertionError):
    """What the platform was waited for did not happen in time."""


class Platform:
    """Runpod's job API for one worker: hands out queued jobs, keeps what the SDK sends."""

    def __init__(self, poll: float = 0.5, ping_interval: float = 1.0, keep_received: bool = True,
                 on_done: Callable[[str], None] | None = None) -> None:
        self.poll, self.ping_interval = poll, ping_interval
        self.keep_received, self.on_done = keep_received, on_done
        self._jobs: deque[dict[str, Any]] = deque()
        self._changed = threading.Condition()
        self._stream_gate = threading.Event()
        self._stream_gate.set()
        self._closing = False
        self.takes = 0  # job-takes received
        self.taking = 0  # job-takes being answered now (long-polling)
        self.first_take: float | None = None  # time.monotonic() of the first one
        self.held_stream_posts = 0
        self.pings: list[dict[str, str]] = []
        self.streams: dict[str, list[Any]] = {}  # per job, every stream post's payload
        self.stream_queries: dict[str, list[dict[str, str]]] = {}
        self.stream_times: dict[str, list[float]] = {}  # per job, when each post arrived
        self.results: dict[str, dict[str, Any]] = {}  # per job, the job-done payload
        self.result_queries: dict[str, dict[str, str]] = {}
        self.received: list[str] = []  # every URL, header and body, to search for leaks
        self.unexpected: list[str] = []
        self.errors: list[str] = []
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-platform")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Platform:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: held posts and long-polls answer, open connections are closed."""
        self._stream_gate.set()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._server.shutdown()  # (waits for serve_forever, which must be running)
        self._server.close_connections()
        self._server.server_close()  # joins the connections' threads
        self._thread.join()

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def check(self) -> None:
        """Fail if a request was unexpected or a handler raised (teardown calls this)."""
        problems = [f"unexpected request: {what}" for what in self.unexpected]
        problems += [f"the fake platform failed:\n{error}" for error in self.errors]
        if problems:
            raise AssertionError("\n".join(problems))

    def env(self) -> dict[str, str]:
        """The variables the platform gives a worker (URL templates as the SDK expects them)."""
        base = f"http://127.0.0.1:{self.port}{PREFIX}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_PING_INTERVAL": str(round(self.ping_interval * 1000)),
            "RUNPOD_POD_ID": WORKER_ID,
            "RUNPOD_AI_API_KEY": "test-platform-key",
        }

    # --- what tests and benchmarks do -----------------------------------------
    def queue_job(self, job_input: Any) -> str:
        """Queue a job for the worker's next job-take; its id."""
        job_id = f"job-{next(_job_ids)}"
        with self._changed:
            self._jobs.append({"id": job_id, "input": job_input})
            self._changed.notify_all()
        return job_id

    def wait(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Until `condition()` (evaluated under the platform's lock) is true, or WaitTimeout."""
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")

    def result(self, job_id: str, timeout: float = 10) -> dict[str, Any]:
        """The job's final result as the platform received it."""
        self.wait(lambda: job_id in self.results, timeout, f"the result of {job_id}")
        return self.results[job_id]

    def wait_done(self, job_ids: list[str], timeout: float) -> None:
        """Until every job in `job_ids` has its result (benchmarks: via asyncio.to_thread)."""
        self.wait(lambda: all(job_id in self.results for job_id in job_ids), timeout,
                  f"{len(job_ids)} jobs to finish")

    def finished(self, job_id: str) -> Finished:
        """Hand back, and forget, everything kept for a job whose result has come."""
        with self._changed:
            self.stream_queries.pop(job_id, None)
            self.result_queries.pop(job_id, None)
            return Finished(self.streams.pop(job_id, []), self.stream_times.pop(job_id, []),
                            self.results.pop(job_id))

    def hold_stream_posts(self) -> None:
        """Answer stream posts only after `release_stream_posts` (a slow platform)."""
        self._stream_gate.clear()

    def release_stream_posts(self) -> None:
        self._stream_gate.set()

    # --- serving -------------------------------------------------------------
    def serve(self, request: _Handler) -> None:
        """Answer one request (in its connection's thread) and keep what it brought."""
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        arrived = time.monotonic()
        text = body.decode("utf-8", errors="replace")
        url = urlsplit(request.path)
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        if self.keep_received:
            with self._changed:
                self.received.append(f"http://127.0.0.1:{self.port}{request.path}\n"
                                     f"{request.headers}\n{text}")
        route = ROUTE.match(url.path)
        kind = route["kind"] if route else ""
        try:
            if not route or (request.command == "POST") != (kind in POSTED) or \
                    bool(route["job"]) != (kind in POSTED):
                with self._changed:
                    self.unexpected.append(f"{request.command} {request.path}")
                status, payload = 404, {"error": "not a route of the job API"}
            else:
                status, payload = self._answer(kind, route["job"], query, text, arrived)
        except Exception:
            with self._changed:
                self.errors.append(traceback.format_exc())
            status, payload = 500, None
        data = b"" if payload is None else json.dumps(payload).encode()
        request.send_response(status)
        if payload is not None:
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
        if kind == "job-done" and status == 200 and self.on_done is not None:
            self.on_done(route["job"] if route else "")

    def _answer(self, kind: str, job_id: str, query: dict[str, str], text: str,
                arrived: float) -> Reply:
        if kind in ("job-take", "job-take-batch"):
            return self._take(int(query.get("batch_size", "1")) if kind != "job-take" else 0)
        if kind == "job-stop":
            return 204, None
        if kind == "ping":
            with self._changed:
                self.pings.append(query)
                self._changed.notify_all()
            return 200, {}
        posted = json.loads(text)
        if kind == "job-stream" and not self._stream_gate.is_set():
            with self._changed:
                self.held_stream_posts += 1
                self._changed.notify_all()
            self._stream_gate.wait(timeout=15)
        with self._changed:
            if kind == "job-done":
                self.results[job_id] = posted
                self.result_queries[job_id] = query
            else:
                self.streams.setdefault(job_id, []).append(posted)
                self.stream_queries.setdefault(job_id, []).append(query)
                self.stream_times.setdefault(job_id, []).append(arrived)
            self._changed.notify_all()
        return 200, {}

    def _take(self, batch: int) -> Reply:
        """Long-poll for queued jobs: the first one, or (batch > 0) a list of up to `batch`."""
        with self._changed:
            self.takes += 1
            self.taking += 1
            if self.first_take is None:
                self.first_take = time.monotonic()
            self._changed.notify_all()
            try:
                self._changed.wait_for(lambda: self._jobs or self._closing, self.poll)
                jobs = [self._jobs.popleft() for _ in range(min(max(batch, 1), len(self._jobs)))]
            finally:
                self.taking -= 1
                self._changed.notify_all()
        if not jobs:
            return 204, None
        return 200, jobs if batch else jobs[0]


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the SDK's aiohttp session uses it; no access log."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.platform.serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class _Server(ThreadingHTTPServer):
    """Binds a free loopback port; knows its open connections, to close them on stop."""

    daemon_threads = True
    request_queue_size = 1024  # hundreds of concurrent stream posts connect at once

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host (slow without a resolver)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A worker killed mid-request is no error of the platform's: stay quiet about it."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):  # already gone
                    connection.shutdown(socket.SHUT_RDWR)
