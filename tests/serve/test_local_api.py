"""The local endpoint over real HTTP, in front of the real handler and a fake vLLM."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from fakes.vllm import free_port
from support import SERVED, LocalEndpoint, proxy_to
from support.workers import CHAT as ASK
from support.workers import SERVED as TINY
from support.workers import Worker, kill_worker, sse_data, start_worker, wait_until
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.child import group_members


def fake_proxy(fake_vllm: HTTPServer) -> Proxy:
    return proxy_to(fake_vllm, request_timeout=5, pacing=Pacing(0))


@pytest.fixture
def endpoint(fake_vllm: HTTPServer) -> Iterator[LocalEndpoint]:
    with LocalEndpoint(fake_proxy(fake_vllm), max_body=1 << 20) as running:
        yield running


def until(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


CHAT = {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}


def test_runsync_returns_the_output_list(fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(CHAT)
    answer = httpx.post(f"{endpoint.url}/runsync", json={"input": {"messages": []}}).json()
    assert answer["status"] == "COMPLETED" and answer["output"] == [CHAT]
    assert answer["id"].startswith("local-") and "executionTime" in answer


def test_a_failed_job_carries_the_error_contract(endpoint: LocalEndpoint) -> None:
    answer = httpx.post(f"{endpoint.url}/runsync",
                        json={"input": {"openai_route": "/sleep", "openai_input": {}}}).json()
    assert answer["status"] == "FAILED"
    assert json.loads(answer["error"])["error"]["code"] == 400


def test_run_then_stream_then_status(fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    release = threading.Event()
    events = [f"data: {i}\n\n".encode() for i in range(6)]

    def paced() -> Iterator[bytes]:
        yield from events[:3]
        release.wait(5)
        yield from events[3:]

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(paced(), content_type="text/event-stream"))
    job = httpx.post(f"{endpoint.url}/run", json={"input": {"messages": [], "stream": True}}
                     ).json()
    assert job["status"] == "IN_QUEUE"
    seen: list[str] = []
    first = httpx.get(f"{endpoint.url}/stream/{job['id']}").json()
    assert first["status"] == "IN_PROGRESS"
    seen += [part["output"] for part in first["stream"]]
    release.set()
    while True:
        poll = httpx.post(f"{endpoint.url}/stream/{job['id']}").json()
        seen += [part["output"] for part in poll["stream"]]
        if poll["status"] == "COMPLETED":
            break
    assert "".join(seen).encode() == b"".join(events)
    status = httpx.get(f"{endpoint.url}/status/{job['id']}").json()
    assert status["status"] == "COMPLETED" and "".join(status["output"]) == "".join(seen)


def test_cancel_stops_the_handler_and_the_vllm_request(
        fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"data: {}\n\n"
                time.sleep(0.01)
        finally:
            closed.set()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(endless(), content_type="text/event-stream"))
    job = httpx.post(f"{endpoint.url}/run", json={"input": {"messages": [], "stream": True}}
                     ).json()
    until(lambda: httpx.get(f"{endpoint.url}/status/{job['id']}").json()["status"]
          == "IN_PROGRESS")
    answer = httpx.post(f"{endpoint.url}/cancel/{job['id']}").json()
    assert answer == {"id": job["id"], "status": "CANCELLED"}
    assert closed.wait(1)


def test_unknown_jobs_are_404(endpoint: LocalEndpoint) -> None:
    answer = httpx.get(f"{endpoint.url}/status/nope")
    assert answer.status_code == 404 and "nope" in answer.json()["error"]["message"]


def test_openai_path_streams_sse_with_the_right_content_type(
        fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    body = b"data: {\"a\": 1}\n\ndata: [DONE]\n\n"
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response([body], content_type="text/event-stream"))
    with httpx.stream("POST", f"{endpoint.url}/openai/v1/chat/completions",
                      json={"messages": [], "stream": True}) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.read() == body
    sent = json.loads(fake_vllm.log[0][0].data)
    assert sent == {"model": SERVED, "messages": [], "stream": True}


def test_openai_path_get_models_and_json_answers(fake_vllm: HTTPServer,
                                                 endpoint: LocalEndpoint) -> None:
    models = {"object": "list", "data": [{"id": SERVED}]}
    fake_vllm.expect_request("/v1/models", method="GET").respond_with_json(models)
    answer = httpx.get(f"{endpoint.url}/openai/v1/models")
    assert answer.status_code == 200 and answer.json() == models


def test_openai_path_failures_keep_status_and_body(
        fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    error = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                       "param": "model", "code": 404}}
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(error, status=404)
    answer = httpx.post(f"{endpoint.url}/openai/v1/chat/completions",
                        json={"model": "x", "messages": [], "stream": True})
    assert answer.status_code == 404 and answer.json() == error
    refused = httpx.post(f"{endpoint.url}/openai/v1/load_lora_adapter", json={})
    assert refused.status_code == 400 and "allowed routes" in refused.json()["error"]["message"]


def test_a_client_that_disconnects_cancels_its_job(
        fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"data: {}\n\n"
                time.sleep(0.01)
        finally:
            closed.set()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(endless(), content_type="text/event-stream"))
    with httpx.stream("POST", f"{endpoint.url}/openai/v1/chat/completions",
                      json={"messages": [], "stream": True}) as answer:
        next(answer.iter_bytes())
    assert closed.wait(1), "vLLM kept generating for a client that left"
    assert endpoint.jobs is not None
    until(lambda: endpoint.jobs is not None and endpoint.jobs.unfinished() == 0)


def test_max_concurrency_queues_extra_jobs(fake_vllm: HTTPServer) -> None:
    release = threading.Event()
    running = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(request: Any) -> Response:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        release.wait(5)
        with lock:
            running["now"] -= 1
        return Response(json.dumps(CHAT), content_type="application/json")

    fake_vllm.expect_request("/v1/chat/completions").respond_with_handler(slow)
    with LocalEndpoint(fake_proxy(fake_vllm), max_concurrency=2) as endpoint:
        ids = [httpx.post(f"{endpoint.url}/run", json={"input": {"messages": []}}).json()["id"]
               for _ in range(5)]
        until(lambda: running["now"] == 2)
        health = httpx.get(f"{endpoint.url}/health").json()
        assert health["jobs"]["inProgress"] == 2 and health["jobs"]["inQueue"] == 3
        release.set()
        until(lambda: all(httpx.get(f"{endpoint.url}/status/{i}").json()["status"] == "COMPLETED"
                          for i in ids))
    assert running["most"] == 2


def test_a_queued_openai_request_is_counted_and_answers_503_once_purged(
        fake_vllm: HTTPServer) -> None:
    release = threading.Event()

    def slow(request: Any) -> Response:
        release.wait(5)
        return Response(json.dumps(CHAT), content_type="application/json")

    fake_vllm.expect_request("/v1/chat/completions").respond_with_handler(slow)
    with LocalEndpoint(fake_proxy(fake_vllm), max_concurrency=1) as endpoint:
        httpx.post(f"{endpoint.url}/run", json={"input": {"messages": []}})
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{endpoint.url}/openai/v1/chat/completions", json={"messages": []}, timeout=10)))
        waiting.start()
        until(lambda: {k: v for k, v in httpx.get(f"{endpoint.url}/health").json()["jobs"].items()
                       if k in ("inProgress", "inQueue")} == {"inProgress": 1, "inQueue": 1})
        purged = httpx.post(f"{endpoint.url}/purge-queue").json()
        waiting.join(5)
        release.set()
        counts = httpx.get(f"{endpoint.url}/health").json()["jobs"]
    assert purged["removed"] == 1 and counts["cancelled"] == 1 and counts["inQueue"] == 0
    assert answers[0].status_code == 503 and "cancelled" in answers[0].json()["error"]["message"]


def test_an_api_key_guards_every_route(fake_vllm: HTTPServer) -> None:
    fake_vllm.expect_request("/v1/models").respond_with_json({"data": []})
    with LocalEndpoint(fake_proxy(fake_vllm), api_key="s3cret-key") as endpoint:
        for method, path in [("GET", "/health"), ("POST", "/runsync"), ("GET", "/openai/v1/models"),
                             ("GET", "/status/x")]:
            assert httpx.request(method, endpoint.url + path).status_code == 401
            wrong = {"Authorization": "Bearer s3cret-kez"}
            assert httpx.request(method, endpoint.url + path, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(f"{endpoint.url}/openai/v1/models", headers=right).status_code == 200
        assert "s3cret-key" not in httpx.get(f"{endpoint.url}/health").text


def test_bodies_over_the_limit_are_refused_with_413(fake_vllm: HTTPServer) -> None:
    with LocalEndpoint(fake_proxy(fake_vllm), max_body=1000) as endpoint:
        big = {"input": {"messages": [{"role": "user", "content": "x" * 2000}]}}
        answer = httpx.post(f"{endpoint.url}/runsync", json=big)
        assert answer.status_code == 413 and "1000 bytes" in answer.json()["error"]["message"]
    assert fake_vllm.log == []


@pytest.mark.parametrize(("body", "words"), [(b"{not json", "not valid JSON"),
                                             (b'{"inputs": {}}', '{"input": {...}}')])
def test_malformed_requests_get_400(endpoint: LocalEndpoint, body: bytes, words: str) -> None:
    answer = httpx.post(f"{endpoint.url}/runsync", content=body)
    assert answer.status_code == 400 and words in answer.json()["error"]["message"]


@pytest.mark.parametrize("wait", ["abc", "nan", "0x10", "", "-5", "999", "300001"])
def test_a_bad_runsync_wait_is_a_400_before_any_job_is_made(
        fake_vllm: HTTPServer, endpoint: LocalEndpoint, wait: str) -> None:
    answer = httpx.post(f"{endpoint.url}/runsync", params={"wait": wait},
                        json={"input": {"messages": []}})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "wait"
    assert "1000 to 300000" in answer.json()["error"]["message"]
    assert endpoint.jobs is not None and endpoint.jobs.counts()["completed"] == 0
    assert fake_vllm.log == []


def test_a_runsync_wait_in_range_is_taken(fake_vllm: HTTPServer, endpoint: LocalEndpoint) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json({"ok": True})
    answer = httpx.post(f"{endpoint.url}/runsync", params={"wait": "1000"},
                        json={"input": {"messages": []}})
    assert answer.status_code == 200 and answer.json()["output"] == [{"ok": True}]


@pytest.fixture
def endpoint_process(tmp_path: Path) -> Iterator[tuple[Worker, str]]:
    """`python local_endpoint.py` as `make run` starts it, the stand-in vLLM its child."""
    port = free_port()
    worker = start_worker(tmp_path, None, "local_endpoint.py", "--port", str(port),
                          FAKE_VLLM_TOKEN_DELAY="0.05", SHUTDOWN_GRACE_PERIOD="1")
    url = f"http://127.0.0.1:{port}/v2/local"
    try:
        wait_until(lambda: "Local endpoint ready" in worker.log(), 30, "the endpoint", worker)
        yield worker, url
    finally:
        kill_worker(worker)


def test_sigterm_gives_work_one_grace_period_then_ends_open_streams_in_band(
        endpoint_process: tuple[Worker, str]) -> None:
    """One grace period in total: streams still open at its end get an error event and
    [DONE]; a /run job that finished meanwhile can still be fetched; nothing is left."""
    worker, url = endpoint_process
    group = worker.vllm_group()
    quick = httpx.post(f"{url}/run", json={"input": {**ASK, "max_tokens": 4}}).json()
    body = {**ASK, "model": TINY, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{url}/openai/v1/chat/completions", json=body,
                      timeout=30) as answer:
        chunks = answer.iter_raw()
        first = next(chunks)
        worker.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        refused = httpx.post(f"{url}/run", json={"input": ASK})
        done = httpx.get(f"{url}/status/{quick['id']}").json()
        text = (first + b"".join(chunks)).decode()
        took = time.monotonic() - signalled
    events = sse_data(text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "grace period" in error["message"]
    assert 1 <= took < 4, "one grace period, not two"
    assert refused.status_code == 503 and done["status"] == "COMPLETED"
    assert worker.exit_code(timeout=15) == 0
    assert group_members(group) == [] and group_members(worker.proc.pid) == []


def test_a_start_up_failure_for_good_fails_runsync_and_openai_calls_with_its_reason(
        tmp_path: Path) -> None:
    port = free_port()
    worker = start_worker(tmp_path, None, "local_endpoint.py", "--port", str(port),
                          MODEL_PATH="/nonexistent/tiny-model", FAILED_START_SECONDS="4")
    url = f"http://127.0.0.1:{port}/v2/local"
    reason = "MODEL_PATH=/nonexistent/tiny-model does not exist."
    try:
        wait_until(lambda: "answering every job with" in worker.log(), 20, "the endpoint",
                   worker)
        done = httpx.post(f"{url}/runsync", json={"input": ASK}, timeout=10).json()
        chat = httpx.post(f"{url}/openai/v1/chat/completions", json=ASK, timeout=10)
        assert done["status"] == "FAILED"
        assert json.loads(done["error"])["error"]["message"] == \
            f"The worker could not start: {reason}"
        assert chat.status_code == 503 and reason in chat.json()["error"]["message"]
        assert worker.exit_code(timeout=20) == 1
        assert worker.log().strip().splitlines()[-1].endswith(f"Exiting: {reason}")
    finally:
        kill_worker(worker)
