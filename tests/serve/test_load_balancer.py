"""The load-balancing mode as Runpod's balancer and clients use it: `python handler.py` with
PORT set and no job queue, the stand-in vLLM (fakes.vllm) as its child, real HTTP.

What vLLM sent is read from the stand-in's record, so bodies and streams are compared
byte for byte; what is left running is read from /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fakes.vllm import free_port
from support.workers import (
    CHAT,
    SERVED,
    Worker,
    kill_worker,
    model_folder,
    sse_data,
    start_worker,
    wait_until,
)
from tiny_adapter import build
from worker.upstream.child import group_members


class LoadBalanced:
    """A load-balancing worker and its base URL."""

    def __init__(self, worker: Worker, port: int) -> None:
        self.worker, self.port = worker, port
        self.url = f"http://127.0.0.1:{port}"

    def ping(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/ping", timeout=5).status_code
        except httpx.TransportError:
            return None

    def ready(self) -> LoadBalanced:
        wait_until(lambda: self.ping() == 200, 30, "/ping 200", self.worker)
        return self


@pytest.fixture
def start_lb(tmp_path: Path) -> Iterator[Callable[..., LoadBalanced]]:
    """Start load-balancing workers; every process they leave is killed after the test."""
    started: list[Worker] = []

    def start(**overrides: str) -> LoadBalanced:
        port = int(overrides.pop("PORT", 0)) or free_port()
        worker = start_worker(tmp_path / f"lb-{len(started)}", None, PORT=str(port),
                              **overrides)
        started.append(worker)
        return LoadBalanced(worker, port)

    yield start
    for worker in started:
        kill_worker(worker)


@pytest.fixture(scope="module")
def lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadBalanced]:
    """One serving worker for the tests that only send requests."""
    port = free_port()
    worker = start_worker(tmp_path_factory.mktemp("lb"), None, PORT=str(port),
                          FAKE_VLLM_TOKEN_DELAY="0.01")
    try:
        yield LoadBalanced(worker, port).ready()
    finally:
        kill_worker(worker)


def chat(**extra: object) -> dict[str, object]:
    return {"model": SERVED, **CHAT, **extra}


def recorded(worker: Worker) -> list[object]:
    """The bodies vLLM sent for chat completions, exactly (the stand-in writes each one
    down once it has sent it)."""
    return [r["response"] for r in worker.vllm_requests() if r["path"] == "/v1/chat/completions"]


def test_ping_answers_204_while_vllm_loads_then_200(start_lb: Callable[..., LoadBalanced]
                                                    ) -> None:
    """Runpod sends traffic only to a 200; 204 says "initializing", never "unhealthy"."""
    server = start_lb(FAKE_VLLM_HEALTHY_AFTER="3")
    wait_until(lambda: server.ping() is not None, 10, "the server to listen", server.worker)
    seen = [server.ping()]
    while seen[-1] != 200:
        assert server.worker.proc.poll() is None, server.worker.log()
        seen.append(server.ping())
    assert seen[0] == 204 and set(seen) == {204, 200}
    early = httpx.post(f"{server.url}/v1/chat/completions", json=chat())
    assert early.status_code == 200
    assert "Serving a load-balancing endpoint on port" in server.worker.log()


def test_a_completion_is_vllms_body_status_and_type(lb: LoadBalanced) -> None:
    answer = httpx.post(f"{lb.url}/v1/chat/completions", json=chat(max_tokens=3))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    wait_until(lambda: answer.text in recorded(lb.worker), 5, "vLLM's record of its answer")


def test_a_stream_is_relayed_byte_for_byte_as_an_event_stream(lb: LoadBalanced) -> None:
    body = chat(max_tokens=40, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{lb.url}/chat/completions", json=body) as answer:
        chunks = list(answer.iter_raw())
        assert answer.headers["content-type"].startswith("text/event-stream")
    relayed = b"".join(chunks).decode()
    wait_until(lambda: relayed in recorded(lb.worker), 5, "vLLM's record of the stream")
    assert len(chunks) > 1 and all(c.endswith(b"\n\n") for c in chunks), "whole events"
    assert sse_data(relayed)[-1] == "[DONE]"


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_models_are_listed_with_and_without_v1(lb: LoadBalanced, path: str) -> None:
    models = httpx.get(f"{lb.url}{path}").json()
    assert [m["id"] for m in models["data"]] == [SERVED]


@pytest.mark.parametrize("path", ["/collective_rpc", "/sleep", "/v1/load_lora_adapter",
                                  "/reset_prefix_cache", "/start_profile", "/metrics",
                                  "/health", "/v1/../collective_rpc", "/docs"])
def test_anything_but_the_serving_routes_is_a_404_that_never_reaches_vllm(
        lb: LoadBalanced, path: str) -> None:
    before = len(lb.worker.vllm_requests())
    answer = httpx.post(f"{lb.url}{path}", json={})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == 404
    assert len(lb.worker.vllm_requests()) == before


def test_the_wrong_method_is_a_405_and_errors_keep_vllms_status_and_body(
        lb: LoadBalanced) -> None:
    wrong = httpx.get(f"{lb.url}/v1/chat/completions")
    assert wrong.status_code == 405 and "takes POST" in wrong.json()["error"]["message"]
    unknown = httpx.post(f"{lb.url}/v1/chat/completions", json=chat(model="nope"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "The model `nope` does not exist."


def test_a_body_over_the_limit_is_a_413(start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(LOCAL_MAX_BODY_MB="0.01").ready()
    answer = httpx.post(f"{server.url}/v1/chat/completions",
                        json=chat(messages=[{"role": "user", "content": "x" * 20000}]))
    assert answer.status_code == 413 and "LOCAL_MAX_BODY_MB" in answer.text


def test_beyond_max_concurrency_a_request_gets_429_to_retry(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(MAX_CONCURRENCY="1", FAKE_VLLM_ANSWER_DELAY="3").ready()
    slow = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/chat/completions",),
                            kwargs={"json": chat(), "timeout": 30})
    slow.start()
    wait_until(lambda: "answering in 3 s" in server.worker.log(), 10, "the slow request")
    busy = httpx.post(f"{server.url}/v1/chat/completions", json=chat())
    slow.join()
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert "MAX_CONCURRENCY" in busy.json()["error"]["message"]
    assert server.ping() == 200, "busy is not unhealthy"


def test_an_api_key_guards_everything_but_ping(start_lb: Callable[..., LoadBalanced]) -> None:
    key = "lb-key-" + os.urandom(6).hex()
    server = start_lb(API_KEY=key).ready()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models",
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/v1/models",
                     headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert key not in server.worker.log()


def test_ping_may_have_a_port_of_its_own(start_lb: Callable[..., LoadBalanced]) -> None:
    health = free_port()
    server = start_lb(PORT_HEALTH=str(health)).ready()
    assert httpx.get(f"http://127.0.0.1:{health}/ping").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{health}/v1/models").status_code == 404
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_the_server_listens_on_every_interface(lb: LoadBalanced) -> None:
    with socket.create_connection((socket.gethostname(), lb.port), timeout=5):
        pass


def test_a_client_that_goes_away_stops_the_generation(lb: LoadBalanced) -> None:
    body = chat(max_tokens=5000, stream=True)
    with httpx.stream("POST", f"{lb.url}/v1/chat/completions", json=body) as answer:
        next(answer.iter_raw())
    wait_until(lambda: "client went away" in lb.worker.log(), 5, "vLLM to see the client go")


def test_several_models_each_reach_their_vllm_and_are_listed_together(
        start_lb: Callable[..., LoadBalanced], tmp_path: Path) -> None:
    first = model_folder(tmp_path / "alpha")
    second = model_folder(tmp_path / "beta")
    server = start_lb(MODEL_NAMES=f"{first};{second}", MODEL_PATH="",
                      VLLM_PORT=str(free_port(2)), FAKE_VLLM_PID_FILE="").ready()
    names = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert names == [str(first), str(second)]
    for name in names:
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=chat(model=name))
        assert answer.status_code == 200 and answer.json()["model"] == name


def test_vllm_killed_mid_stream_ends_it_in_band_then_ping_503_and_the_worker_goes(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(FAKE_VLLM_TOKEN_DELAY="0.02", FAKE_VLLM_GRANDCHILD="obey").ready()
    vllm = server.worker.vllm_pid()
    group = server.worker.vllm_group()
    body = chat(max_tokens=2000, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as answer:
        chunks = answer.iter_raw()
        first = next(chunks)
        os.kill(vllm, signal.SIGKILL)
        rest = b"".join(chunks)
        pings = [server.ping()]
    events = sse_data((first + rest).decode())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "SIGKILL" in error["message"]
    assert pings[0] in (503, None), "never 200 again"
    assert server.worker.exit_code(timeout=10) != 0
    assert group_members(group) == [] and group_members(server.worker.proc.pid) == []


def test_sigterm_gives_streams_the_grace_period_then_ends_them_in_band(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(FAKE_VLLM_TOKEN_DELAY="0.05", SHUTDOWN_GRACE_PERIOD="1",
                      FAKE_VLLM_GRANDCHILD="obey").ready()
    group = server.worker.vllm_group()
    body = chat(max_tokens=400, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as answer:
        chunks = answer.iter_raw()
        first = next(chunks)
        server.worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.ping() != 200, 5, "/ping to stop answering 200")
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat())
        signalled = time.monotonic()
        rest = b"".join(chunks)
        took = time.monotonic() - signalled
    events = sse_data((first + rest).decode())
    assert refused.status_code == 503 and "stopping" in refused.json()["error"]["message"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
    assert json.loads(events[1])["choices"], "the stream ran during the grace period"
    assert took < 5
    assert server.worker.exit_code(timeout=15) == 0
    assert group_members(group) == [] and group_members(server.worker.proc.pid) == []


def test_sigterm_while_vllm_loads_stops_it_and_exits_0(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(FAKE_VLLM_HEALTHY_AFTER="60", FAKE_VLLM_GRANDCHILD="obey")
    group = server.worker.vllm_group()
    wait_until(lambda: server.ping() == 204, 10, "/ping 204", server.worker)
    server.worker.proc.send_signal(signal.SIGTERM)
    assert server.worker.exit_code(timeout=15) == 0
    assert group_members(group) == [] and group_members(server.worker.proc.pid) == []


def test_a_failed_start_exits_1_naming_the_cause(start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(FAKE_VLLM_EXIT_AFTER="0", FAKE_VLLM_EXIT_CODE="3")
    assert server.worker.exit_code(timeout=20) == 1
    assert "Start-up failed: vLLM exited with code 3 during start-up." in server.worker.log()


def test_adapters_static_and_on_demand_are_served_and_listed_with_their_parent(
        start_lb: Callable[..., LoadBalanced], tmp_path: Path) -> None:
    build(tmp_path / "static")
    build(tmp_path / "second", seed=3)
    build(tmp_path / "adapters" / "late", seed=2)
    (tmp_path / "adapters" / "broken").mkdir()
    server = start_lb(LORA_MODULES=f"static={tmp_path / 'static'} second={tmp_path / 'second'}",
                      LORA_DIR=str(tmp_path / "adapters")).ready()

    def listed() -> list[tuple[str, str | None]]:
        return [(m["id"], m["parent"]) for m in httpx.get(f"{server.url}/v1/models").json()["data"]]

    assert listed() == [(SERVED, None), ("static", SERVED), ("second", SERVED)]
    body = chat(model="late", stream=True, max_tokens=3)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as answer:
        events = sse_data(answer.read().decode())
    broken = httpx.post(f"{server.url}/v1/chat/completions", json=chat(model="broken"))

    assert answer.status_code == 200 and json.loads(events[0])["model"] == "late"
    assert listed() == [(SERVED, None), ("static", SERVED), ("second", SERVED),
                        ("late", SERVED)]
    loads = [r["body"] for r in server.worker.vllm_requests()
             if r["path"] == "/v1/load_lora_adapter"]
    assert loads == [{"lora_name": "late", "lora_path": str(tmp_path / "adapters" / "late")}]
    assert broken.status_code == 400
    assert broken.json()["error"]["message"] == (
        f"LoRA adapter broken: {tmp_path / 'adapters' / 'broken'} has no adapter_config.json.")


def test_with_only_the_local_endpoints_key_the_server_warns_at_start_that_it_is_open(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(LOCAL_API_KEY="local-only-key").ready()
    warning = next(line for line in server.worker.log().splitlines() if "asks no API key" in line)
    assert "WARNING" in warning and "set API_KEY" in warning
    assert "LOCAL_API_KEY guards the local endpoint only" in warning
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200, "it is open"
    guarded = start_lb(API_KEY="lb-key").ready()
    assert "asks no API key" not in guarded.worker.log()


def test_a_start_up_failure_for_good_is_a_503_with_its_reason_until_the_worker_exits(
        start_lb: Callable[..., LoadBalanced]) -> None:
    server = start_lb(MODEL_PATH="/nonexistent/tiny-model", FAILED_START_SECONDS="4")
    reason = "MODEL_PATH=/nonexistent/tiny-model does not exist."
    wait_until(lambda: server.ping() == 503, 20, "/ping 503", server.worker)
    ping = httpx.get(f"{server.url}/ping", timeout=5).json()
    chat = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=5)
    assert ping == {"status": "failed", "error": reason}
    assert chat.status_code == 503
    assert chat.json()["error"]["message"] == f"The worker could not start: {reason}"
    assert server.worker.exit_code(timeout=20) == 1
    assert server.worker.log().strip().splitlines()[-1].endswith(f"Exiting: {reason}")
