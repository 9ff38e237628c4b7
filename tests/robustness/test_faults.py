"""Faults a deployment meets, each injected on cue and its outcome asserted as users see it.

- vLLM dying (SIGKILL mid-stream, at start-up, never healthy): `python handler.py`
  under the fake job API (fakes.platform) with the stand-in vLLM (fakes.vllm) as its
  child; what is left running is read from /proc, group by group.
- An upstream that hangs or answers garbage: the handler (and the local endpoint) in
  front of pytest-httpserver or a raw TCP server that writes exactly the bytes given.
- SIGTERM while streaming, with a vLLM that ignores it.
- Cancellations and client disconnects, 100 of each, counting what is left open:
  upstream connections (the fast stand-in counts them), file descriptors, asyncio tasks.
The same faults on the real vLLM are in test_e2e_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from fakes.platform import Platform
from handler import make_handler
from support import SERVED, LocalEndpoint, StandIn, job_error, proxy_to, run_job
from support.workers import CHAT, Worker, serving, sse_data, wait_until
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.child import group_members
from worker.upstream.target import Target

ROUNDS = 100


def chat_job(**body: Any) -> dict[str, Any]:
    return {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, **body}}


def in_band_error(text: str) -> dict[str, Any]:
    """The OpenAI error a chat stream ends with (`data: {"error": ...}` then `[DONE]`)."""
    data = sse_data(text)
    assert data[-1] == "[DONE]", text[-300:]
    return json.loads(data[-2])["error"]


# ------------------------------------------------------------- vLLM dying --

def test_vllm_killed_with_jobs_in_flight_fails_each_clearly_and_the_worker_is_gone_in_5_s(
        start_workers: Callable[..., Worker], job_platform: Platform) -> None:
    """A started stream gets an in-band 503, a request still waiting a 503, a new job a 503;
    then the worker exits non-zero within 5 s, and nothing of vLLM's group is left, even an
    engine core that ignores SIGTERM (it would keep the GPU memory)."""
    platform = job_platform
    worker = serving(start_workers(FAKE_VLLM_TOKEN_DELAY="0.02", FAKE_VLLM_ANSWER_DELAY="30",
                                   FAKE_VLLM_GRANDCHILD="ignore-sigterm"), platform)
    vllm = worker.vllm_pid()
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core", worker)
    streaming = platform.queue_job(chat_job(max_tokens=2000, stream=True))
    platform.wait(lambda: platform.streams.get(streaming), 10, "the stream's first post")
    waiting = platform.queue_job(chat_job())
    wait_until(lambda: "answering in 30 s" in worker.log(), 10, "the request at vLLM", worker)
    platform.hold_stream_posts()  # keep the stream in flight while the next job is taken
    platform.wait(lambda: platform.held_stream_posts, 5, "a stream post to hold")

    os.kill(vllm, signal.SIGKILL)
    killed = time.monotonic()
    later = platform.queue_job(chat_job())
    later_result, waiting_result = platform.result(later), platform.result(waiting)
    platform.release_stream_posts()
    streamed = platform.result(streaming)
    code = worker.exit_code(timeout=10)
    took = time.monotonic() - killed

    assert code != 0
    assert took < 5, f"the worker took {took:.1f} s to exit"
    assert group_members(group) == [], "vLLM's engine core outlived the worker"
    assert group_members(worker.proc.pid) == []
    for result in (later_result, waiting_result):
        assert set(result) == {"error"}
        error = json.loads(result["error"])["error"]
        assert error["code"] == 503 and "killed by SIGKILL" in error["message"]
    error = in_band_error(streamed["output"][-1])
    assert error["code"] == 503 and "vLLM is not running (for tiny-model killed by SIGKILL)" in \
        error["message"]
    assert "Traceback" not in worker.log()


@pytest.mark.parametrize(("switches", "reason", "last_line"), [
    ({"FAKE_VLLM_NEVER_HEALTHY": "1"},
     "Start-up failed: vLLM was not healthy after 3 s (VLLM_STARTUP_TIMEOUT).",
     '"GET /health HTTP/1.1" 503'),
    ({"FAKE_VLLM_EXIT_AFTER": "1", "FAKE_VLLM_HEALTHY_AFTER": "60"},
     "Start-up failed: vLLM exited with code 1 during start-up.",
     "RuntimeError: simulated start-up failure (exit code 1)"),
], ids=["never-healthy", "dies-while-loading"])
def test_a_vllm_that_never_becomes_healthy_or_dies_loading_ends_the_worker_with_its_last_lines(
        start_workers: Callable[..., Worker], job_platform: Platform,
        switches: dict[str, str], reason: str, last_line: str) -> None:
    """The reason and vLLM's own last lines are in the log, within the start-up timeout, no
    job was ever taken, and no process of vLLM's group (engine core included) is left."""
    worker = start_workers(VLLM_STARTUP_TIMEOUT="3", FAKE_VLLM_GRANDCHILD="obey", **switches)
    started = time.monotonic()
    group = worker.vllm_group()

    code = worker.exit_code(timeout=15)
    took = time.monotonic() - started

    assert code == 1
    assert took < 3 + 3, f"the worker took {took:.1f} s to give up"
    log = worker.log()
    assert reason in log
    assert "Its last lines:\n" in log and last_line in log.split(reason, 1)[1]
    assert "Traceback" not in log
    assert group_members(group) == [] and group_members(worker.proc.pid) == []
    assert job_platform.takes == 0


# ------------------------------------------------------------------ SIGTERM --

def test_sigterm_finishes_the_streams_in_flight_takes_no_new_job_and_kills_a_stubborn_vllm(
        start_workers: Callable[..., Worker], job_platform: Platform) -> None:
    """Scale-down: three answers being streamed end whole, no job is taken after the signal,
    and a vLLM whose server and engine core both ignore SIGTERM is SIGKILLed."""
    platform = job_platform
    worker = serving(start_workers(FAKE_VLLM_TOKEN_DELAY="0.05", FAKE_VLLM_IGNORE_SIGTERM="1",
                                   FAKE_VLLM_GRANDCHILD="ignore-sigterm",
                                   SHUTDOWN_GRACE_PERIOD="10"), platform)
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core", worker)
    jobs = [platform.queue_job(chat_job(max_tokens=60, stream=True)) for _ in range(3)]
    platform.wait(lambda: all(platform.streams.get(j) for j in jobs), 10, "three streams")

    def posts() -> int:
        return sum(len(platform.streams.get(j, [])) for j in jobs)

    worker.proc.send_signal(signal.SIGTERM)
    signalled, posts_at_signal = time.monotonic(), posts()
    # Half a second of streaming later (a job-take long-polls 0.5 s) with no take pending,
    # the worker has stopped asking for jobs.
    platform.wait(lambda: platform.taking == 0 and posts() >= posts_at_signal + 30, 10,
                  "the drain to go on with no job-take pending")
    takes = platform.takes
    late = platform.queue_job(chat_job())
    results = [platform.result(j, timeout=15) for j in jobs]
    code = worker.exit_code(timeout=30)

    assert code == 0
    assert time.monotonic() - signalled < 10 + 10 + 5, "grace, then vLLM's 10 s, then SIGKILL"
    for result in results:
        data = sse_data("".join(result["output"]))
        assert data[-1] == "[DONE]"
        assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[1:-1]] == [
            f"tok{i} " for i in range(60)]
    assert platform.takes == takes and late not in platform.results
    assert "sending SIGKILL" in worker.log()
    assert group_members(group) == [] and group_members(worker.proc.pid) == []


# ------------------------------------------------------------ upstream hangs --

def stalled_stream(events: int, release: threading.Event) -> Iterator[bytes]:
    """`events` events, then silence with the connection open, until `release` (or 10 s)."""
    for i in range(events):
        yield f"data: {{\"i\": {i}}}\n\n".encode()
    release.wait(10)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Ends a stalled upstream's silence when the test is over."""
    event = threading.Event()
    yield event
    event.set()


def timed_job(proxy: Proxy, job_input: Any, deadline: float) -> tuple[list[Any], float]:
    """The job's yields and how long it took; failing if it is still running at `deadline`."""
    started = time.monotonic()
    items = run_job(proxy, job_input, deadline)
    return items, time.monotonic() - started


def test_a_stream_that_goes_silent_ends_with_an_in_band_504_after_the_idle_timeout(
        fake_vllm: HTTPServer, release: threading.Event) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(stalled_stream(3, release), content_type="text/event-stream"))
    proxy = proxy_to(fake_vllm, request_timeout=0.5, pacing=Pacing(0))
    assert proxy is not None

    items, took = timed_job(proxy, {"messages": [], "stream": True}, deadline=10)

    assert "".join(items[:-1]) == "".join(f"data: {{\"i\": {i}}}\n\n" for i in range(3))
    error = in_band_error(items[-1])
    assert error["code"] == 504 and "REQUEST_TIMEOUT" in error["message"]
    assert took >= 0.5, "not cut before the idle time"


def test_a_stream_silent_from_its_first_byte_fails_the_job_with_504(
        fake_vllm: HTTPServer, release: threading.Event) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(stalled_stream(0, release), content_type="text/event-stream"))
    proxy = proxy_to(fake_vllm, request_timeout=0.5, pacing=Pacing(0))
    assert proxy is not None

    items, took = timed_job(proxy, {"messages": [], "stream": True}, deadline=10)

    error = job_error(items)
    assert len(items) == 1 and error["code"] == 504 and "REQUEST_TIMEOUT" in error["message"]
    assert took >= 0.5


def test_a_generation_ten_times_longer_than_the_idle_timeout_is_not_cut(
        fake_vllm: HTTPServer) -> None:
    def live() -> Iterator[bytes]:
        for i in range(20):
            time.sleep(0.15)  # the upstream's own pace: 3 s in all, each gap half the timeout
            yield f"data: {i}\n\n".encode()
        yield b"data: [DONE]\n\n"

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(live(), content_type="text/event-stream"))
    proxy = proxy_to(fake_vllm, request_timeout=0.3, pacing=Pacing(0))
    assert proxy is not None

    items, took = timed_job(proxy, {"messages": [], "stream": True}, deadline=20)

    assert "".join(items) == "".join(f"data: {i}\n\n" for i in range(20)) + "data: [DONE]\n\n"
    assert took >= 10 * 0.3


def test_the_local_endpoint_ends_a_silent_stream_for_its_client(
        fake_vllm: HTTPServer, release: threading.Event) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(stalled_stream(2, release), content_type="text/event-stream"))
    proxy = proxy_to(fake_vllm, request_timeout=0.5, pacing=Pacing(0))
    with LocalEndpoint(proxy) as endpoint:
        answer = httpx.post(f"{endpoint.url}/openai/v1/chat/completions", timeout=10,
                            json={"messages": [], "stream": True})
    assert answer.status_code == 200
    assert answer.text.startswith("data: {\"i\": 0}\n\ndata: {\"i\": 1}\n\n")
    assert in_band_error(answer.text)["code"] == 504


# ------------------------------------------------------------ upstream garbage --

def read_request(conn: socket.socket) -> None:
    """Read one HTTP request (headers and a Content-Length body) off the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            return
        body += piece


def reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class RawUpstream:
    """A loopback TCP server that reads each request and answers with a script of bytes."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            read_request(conn)
            self.requests += 1
            self.script(conn)

    def close(self) -> None:
        self.listener.close()


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
FIRST = b"data: {\"first\": true}\n\n"
FIRST_CHUNK = b"%x\r\n%s\r\n" % (len(FIRST), FIRST)


def send_then(data: bytes, end: Callable[[socket.socket], None] = socket.socket.close
              ) -> Callable[[socket.socket], None]:
    def script(conn: socket.socket) -> None:
        conn.sendall(data)
        end(conn)
    return script


def json_head(length: int, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d"
            b"\r\n\r\n" % (extra, length))


BEFORE_OUTPUT = {
    "reset-at-once": reset,
    "closed-without-answer": socket.socket.close,
    "not-http": send_then(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n"),
    "binary-noise": send_then(bytes(range(256)) * 4),
    "body-shorter-than-its-length": send_then(json_head(1000) + b"{\"choices\": ["),
    "reset-mid-body": send_then(json_head(1000) + b"{\"choices\": [", reset),
    "truncated-json": send_then(json_head(13) + b"{\"choices\": ["),
    "bad-gzip": send_then(json_head(12, b"content-encoding: gzip\r\n") + b"not gzip !!!"),
    "sse-bad-chunk-size": send_then(SSE_HEAD + b"zz\r\nnonsense\r\n"),
}
AFTER_OUTPUT = {
    "reset-mid-stream": send_then(SSE_HEAD + FIRST_CHUNK, reset),
    "closed-mid-stream": send_then(SSE_HEAD + FIRST_CHUNK),
    "truncated-event": send_then(SSE_HEAD + FIRST_CHUNK + b"7\r\ndata: {\r\n0\r\n\r\n"),
    "noise-in-chunk": send_then(SSE_HEAD + FIRST_CHUNK + b"5\r\n\xff\xfe\x00\x01\x02\r\n"),
}


@pytest.fixture
def upstream_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    unexpected = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert unexpected == [], "a traceback was logged"


@pytest.mark.parametrize("name", sorted(BEFORE_OUTPUT))
def test_garbage_before_any_output_fails_the_job_with_a_502(
        name: str, upstream_log: pytest.LogCaptureFixture) -> None:
    upstream = RawUpstream(BEFORE_OUTPUT[name])
    proxy = Proxy(Target(SERVED, upstream.url), request_timeout=5)
    assert proxy is not None
    try:
        items, _ = timed_job(proxy, {"messages": [], "stream": True}, deadline=10)
    finally:
        upstream.close()
    error = job_error(items)
    assert len(items) == 1 and upstream.requests == 1
    assert error["code"] == 502 and error["type"] == "BadGatewayError"
    assert error["message"].startswith(("The connection to vLLM broke: ", "vLLM answered ",
                                        "vLLM's stream ended in the middle of an event"))
    assert "Traceback" not in error["message"]
    no_traceback(upstream_log)


@pytest.mark.parametrize("name", sorted(AFTER_OUTPUT))
def test_garbage_after_a_stream_started_ends_it_with_an_in_band_502(
        name: str, upstream_log: pytest.LogCaptureFixture) -> None:
    upstream = RawUpstream(AFTER_OUTPUT[name])
    proxy = Proxy(Target(SERVED, upstream.url), request_timeout=5, pacing=Pacing(0))
    try:
        items, _ = timed_job(proxy, {"messages": [], "stream": True}, deadline=10)
    finally:
        upstream.close()
    assert items[0] == FIRST.decode()
    error = in_band_error("".join(items))
    assert error["code"] == 502 and error["type"] == "BadGatewayError"
    assert "Traceback" not in error["message"]
    no_traceback(upstream_log)


def test_a_bad_chunk_read_with_the_event_before_it_is_a_502_and_nothing_corrupt_relayed(
        upstream_log: pytest.LogCaptureFixture) -> None:
    """aiohttp's parser refuses a read as a whole when it holds a bad chunk: the valid event
    read together with it is lost with it, so the job fails 502 before any output (or, had
    the event come in a read of its own, after it, in band). Never a corrupt byte relayed."""
    upstream = RawUpstream(send_then(SSE_HEAD + FIRST_CHUNK + b"zz\r\nnonsense\r\n"))
    proxy = Proxy(Target(SERVED, upstream.url), request_timeout=5, pacing=Pacing(0))
    try:
        items, _ = timed_job(proxy, {"messages": [], "stream": True}, deadline=10)
    finally:
        upstream.close()
    error = job_error(items) if isinstance(items[-1], dict) else in_band_error("".join(items))
    assert items[0] in (FIRST.decode(), items[-1])
    assert error["code"] == 502 and "not valid HTTP" in error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    no_traceback(upstream_log)


@pytest.mark.parametrize("name", ["not-http", "reset-at-once", "truncated-json"])
def test_the_local_endpoint_answers_upstream_garbage_with_http_502(name: str) -> None:
    upstream = RawUpstream(BEFORE_OUTPUT[name])
    try:
        with LocalEndpoint(Proxy(Target(SERVED, upstream.url), request_timeout=5)) as endpoint:
            answer = httpx.post(f"{endpoint.url}/openai/v1/chat/completions", timeout=10,
                                json={"messages": []})
    finally:
        upstream.close()
    assert answer.status_code == 502
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert answer.json()["error"]["code"] == 502


# ------------------------------------------------- cancellations and leaks --

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def endless(stream: int) -> dict[str, Any]:
    """A stream the fast stand-in sends until the client goes away."""
    return {"messages": [], "stream": True, "load_stream": stream, "load_events": 0}


def test_100_cancelled_jobs_close_their_upstream_within_1_s_and_leak_nothing(
        stand_in: StandIn) -> None:
    """The SDK cancels a job's task (Runpod's cancel): each time, vLLM's connection must
    close at once; after 100, no connection, task or file descriptor may be left over."""
    proxy = Proxy(Target(SERVED, stand_in.url), request_timeout=30, pacing=Pacing(0))
    handler = make_handler(proxy)

    async def cancel_one(stream: int) -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in handler({"id": f"c{stream}", "input": endless(stream)}):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(stand_in.wait_for, lambda s: s["streams"] == 0, 1,
                                f"cancelled stream {stream} to close upstream")

    async def scenario() -> tuple[tuple[int, int], tuple[int, int], dict[str, int]]:
        try:
            await cancel_one(-1)  # the pool, the logger and the like exist from here on
            before = open_fds(), len(asyncio.all_tasks())
            for stream in range(ROUNDS):
                await cancel_one(stream)
            after = open_fds(), len(asyncio.all_tasks())
            stats = await asyncio.to_thread(stand_in.stats)
            return before, after, stats
        finally:
            await proxy.aclose()

    before, after, stats = asyncio.run(asyncio.wait_for(scenario(), 120))

    assert stats["streams_aborted"] == ROUNDS + 1 and stats["streams_done"] == 0
    assert stats["connections"] == 0, "a cancelled job's connection stayed open"
    assert after[1] == before[1], "tasks left behind"
    assert after[0] <= before[0], "file descriptors left open"


def test_100_local_endpoint_clients_that_leave_or_cancel_leak_nothing(
        stand_in: StandIn) -> None:
    """50 OpenAI clients leave mid-stream and 50 /run jobs are cancelled: each upstream
    connection closes within 1 s, and afterwards the endpoint holds no job, task,
    connection or file descriptor more than before."""
    proxy = Proxy(Target(SERVED, stand_in.url), request_timeout=30, pacing=Pacing(0))

    async def tasks_now() -> int:
        return len(asyncio.all_tasks())

    with LocalEndpoint(proxy) as endpoint, httpx.Client(timeout=10) as client:

        def closes_upstream(what: str) -> None:
            stand_in.wait_for(lambda s: s["streams"] == 0, 1, what)

        def leave(stream: int) -> None:
            with client.stream("POST", f"{endpoint.url}/openai/v1/chat/completions",
                               json=endless(stream)) as answer:
                next(answer.iter_bytes())
            closes_upstream(f"client {stream} gone")

        def cancel(stream: int) -> None:
            job = client.post(f"{endpoint.url}/run", json={"input": endless(stream)}).json()
            stand_in.wait_for(lambda s: s["streams"] == 1, 5, "the job's stream")
            cancelled = client.post(f"{endpoint.url}/cancel/{job['id']}").json()
            assert cancelled["status"] == "CANCELLED"
            closes_upstream(f"job {stream} cancelled")

        leave(-1)
        cancel(-2)
        before = open_fds(), endpoint.call(tasks_now)
        for stream in range(ROUNDS // 2):
            leave(stream)
            cancel(ROUNDS + stream)
        assert endpoint.jobs is not None
        wait_until(lambda: endpoint.jobs is not None and endpoint.jobs.unfinished() == 0, 5,
                   "every job to end")
        after = open_fds(), endpoint.call(tasks_now)
        counts = endpoint.jobs.counts()
        stats = stand_in.stats()

    assert counts["cancelled"] == ROUNDS + 2 and counts["completed"] == 0
    assert stats["streams_aborted"] == ROUNDS + 2 and stats["connections"] == 0
    assert after[1] == before[1], "tasks left behind in the endpoint"
    assert after[0] <= before[0], "file descriptors left open"

