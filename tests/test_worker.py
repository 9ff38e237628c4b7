"""The whole worker as deployments run it: `python handler.py` against a fake platform.

The worker is a real subprocess with the Runpod SDK pointed at the fake job API
(fakes.platform) and the stand-in vLLM (fakes.vllm) as its child, so what
is asserted is what the platform receives after the SDK transformed the
handler's output, and what is left running after the worker ends (read from
/proc). Every process group a test starts is SIGKILLed when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from fakes.platform import Platform
from support.workers import (
    CHAT,
    SERVED,
    Worker,
    kill_worker,
    serving,
    sse_data,
    start_worker,
    wait_until,
)
from worker.upstream.child import group_members

# ----------------------------------------------------------------- the worker --


@pytest.fixture
def platform(job_platform: Platform) -> Platform:
    """The fake job API (conftest's `job_platform`), checked for stray requests at the end."""
    return job_platform


@pytest.fixture
def launch(start_workers: Callable[..., Worker]) -> Callable[..., Worker]:
    """Start workers for one test (conftest's `start_workers`): all they leave is killed."""
    return start_workers


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Platform]]:
    """One serving worker for the tests that only run jobs (saves a start-up per test)."""
    with Platform() as platform:
        worker = start_worker(tmp_path_factory.mktemp("shared-worker"), platform,
                              FAKE_VLLM_TOKEN_DELAY="0.02")
        try:
            yield serving(worker, platform), platform
        finally:
            kill_worker(worker)
    platform.check()


# ------------------------------------------------------------ jobs, as posted --

def test_chat_job_result_is_the_vllm_body_in_a_list(shared: tuple[Worker, Platform]) -> None:
    """A non-stream job must reach the client as vLLM's own body, which the SDK wraps in a list."""
    worker, platform = shared
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions",
                                 "openai_input": {**CHAT, "max_tokens": 3}})

    result = platform.result(job_id)

    sent = [r for r in worker.vllm_requests() if r["body"] == {"model": SERVED, **CHAT,
                                                               "max_tokens": 3}]
    assert len(sent) == 1, "the served model name is filled in and nothing else changes"
    assert result == {"output": [json.loads(sent[0]["response"])]}
    assert result["output"][0]["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert platform.result_queries[job_id]["isStream"] == "true"  # the handler is a generator


def test_stream_posts_concatenate_to_the_exact_sse_body(
        shared: tuple[Worker, Platform]) -> None:
    """Clients parse the stream posts as one SSE body: no event may be cut, lost or altered."""
    worker, platform = shared
    body = {**CHAT, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}}
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions", "openai_input": body})

    result = platform.result(job_id)

    posts = platform.streams[job_id]
    texts = [post["output"] for post in posts]
    assert all(set(post) == {"output"} and isinstance(post["output"], str) for post in posts)
    assert len(texts) > 1, "a 0.4 s stream goes out in several posts"
    for text in texts:  # whole events only: each payload in a post parses on its own
        assert text.startswith("data: ") and text.endswith("\n\n")
        assert all(d == "[DONE]" or json.loads(d) for d in sse_data(text))
    sent = [r for r in worker.vllm_requests() if r["body"] == {"model": SERVED, **body}]
    assert len(sent) == 1
    assert "".join(texts) == sent[0]["response"]
    data = sse_data("".join(texts))
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"] == [], "the usage chunk"
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[1:-2]]
    assert contents == [f"tok{i} " for i in range(20)]
    assert result == {"output": texts}, "the final result aggregates the posts"
    assert {query["isStream"] for query in platform.stream_queries[job_id]} == {"false"}
    assert platform.result_queries[job_id]["isStream"] == "true"


def test_route_vllm_must_not_expose_fails_the_job_with_an_openai_400(
        shared: tuple[Worker, Platform]) -> None:
    """Admin routes are refused before vLLM, as a FAILED job whose error clients can parse."""
    worker, platform = shared
    before = len(worker.vllm_requests())
    job_id = platform.queue_job({"openai_route": "/collective_rpc", "openai_input": {}})

    result = platform.result(job_id)

    assert set(result) == {"error"}
    error = json.loads(result["error"])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == 400
    assert "/collective_rpc" in error["error"]["message"]
    assert len(worker.vllm_requests()) == before
    assert job_id not in platform.streams


def test_bare_models_route_returns_the_model_list(shared: tuple[Worker, Platform]) -> None:
    """The hosted OpenAI `GET /models` arrives as a bare route and must list the served model."""
    _worker, platform = shared
    job_id = platform.queue_job({"openai_route": "/v1/models"})

    result = platform.result(job_id)

    assert list(result) == ["output"] and len(result["output"]) == 1
    models = result["output"][0]
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        (SERVED, "model", "vllm")]


def test_worker_pings_the_platform_while_serving(shared: tuple[Worker, Platform]) -> None:
    """Without pings the platform takes the worker for dead."""
    _worker, platform = shared
    platform.wait(lambda: platform.pings, 5, "a ping")
    assert "runpod_version" in platform.pings[0]


# ------------------------------------------------------- dying and stopping --

def test_vllm_killed_mid_stream_fails_jobs_and_exits_non_zero_leaving_nothing(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A worker whose vLLM died must fail fast and go, so the platform replaces it."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.02", FAKE_VLLM_GRANDCHILD="obey"),
                     platform)
    vllm = worker.vllm_pid()
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core")
    streaming = platform.queue_job({"openai_route": "/v1/chat/completions",
                                    "openai_input": {**CHAT, "max_tokens": 2000,
                                                     "stream": True}})
    platform.wait(lambda: platform.streams.get(streaming), 10, "the stream's first post")
    # Keep the stream job in flight while vLLM dies and the next job is taken.
    platform.hold_stream_posts()
    platform.wait(lambda: platform.held_stream_posts, 5, "a stream post to hold")

    os.kill(vllm, signal.SIGKILL)
    killed = time.monotonic()
    later = platform.queue_job({"openai_route": "/v1/chat/completions", "openai_input": CHAT})
    later_result = platform.result(later)
    platform.release_stream_posts()
    streamed = platform.result(streaming)
    code = worker.exit_code(timeout=8)

    assert code != 0
    assert time.monotonic() - killed < 8
    assert group_members(group) == [], "the engine core must not outlive the worker"
    assert group_members(worker.proc.pid) == [], "nor the SDK's heartbeat process"
    assert set(later_result) == {"error"}
    assert json.loads(later_result["error"])["error"]["code"] == 503
    last = streamed["output"][-1]
    events = sse_data(last)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "SIGKILL" in error["message"]
    assert "killed by SIGKILL while serving" in worker.log()


def test_a_worker_killed_by_sigkill_mid_stream_takes_its_vllm_with_it(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """No signal reaches vLLM when its worker is SIGKILLed (outside a container nothing
    else ends it): its guard sees the worker gone and ends the whole group, the engine
    core that ignores SIGTERM included."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.02", FAKE_VLLM_GRANDCHILD="ignore-sigterm"),
                     platform)
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core")
    streaming = platform.queue_job({"openai_route": "/v1/chat/completions",
                                    "openai_input": {**CHAT, "max_tokens": 5000,
                                                     "stream": True}})
    platform.wait(lambda: platform.streams.get(streaming), 10, "the stream's first post")

    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker alone, not its group
    killed = time.monotonic()
    wait_until(lambda: group_members(group) == [], 10, "every vLLM process gone")
    assert time.monotonic() - killed < 3 + 2, "within the guard's grace, then SIGKILL"


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_zero(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A scale-down must not cut the answers being streamed; then nothing may be left running."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.05", FAKE_VLLM_GRANDCHILD="obey",
                            SHUTDOWN_GRACE_PERIOD="10"), platform)
    group = worker.vllm_group()
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions",
                                 "openai_input": {**CHAT, "max_tokens": 30, "stream": True}})
    platform.wait(lambda: platform.streams.get(job_id), 10, "the stream's first post")

    worker.proc.send_signal(signal.SIGTERM)
    result = platform.result(job_id)
    code = worker.exit_code(timeout=10)

    texts = result["output"]
    assert texts == [post["output"] for post in platform.streams[job_id]]
    data = sse_data("".join(texts))
    assert data[-1] == "[DONE]"
    assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[1:-1]] == [
        f"tok{i} " for i in range(30)]
    assert code == 0
    assert group_members(group) == []
    assert group_members(worker.proc.pid) == [], "nothing of the worker may be left either"


def test_sigterm_stops_within_the_grace_period_when_a_stream_outlasts_it(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """The platform SIGKILLs a worker that lingers: the grace period must bound the drain."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.05", SHUTDOWN_GRACE_PERIOD="1"), platform)
    group = worker.vllm_group()
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions",
                                 "openai_input": {**CHAT, "max_tokens": 400, "stream": True}})
    platform.wait(lambda: platform.streams.get(job_id), 10, "the stream's first post")

    worker.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = worker.exit_code(timeout=10)

    assert code == 0
    assert 1 <= time.monotonic() - signalled < 5
    assert "job(s) still running after 1 s: stopping anyway" in worker.log()
    assert group_members(group) == []
    assert group_members(worker.proc.pid) == []


def test_sigterm_with_stubborn_vllm_still_leaves_no_process(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A vLLM that ignores SIGTERM (engine core too) would keep the GPU: it is SIGKILLed."""
    worker = serving(launch(FAKE_VLLM_IGNORE_SIGTERM="1", FAKE_VLLM_GRANDCHILD="ignore-sigterm",
                            SHUTDOWN_GRACE_PERIOD="1"), platform)
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core")

    worker.proc.send_signal(signal.SIGTERM)
    code = worker.exit_code(timeout=30)  # vLLM gets 10 s after SIGTERM, then SIGKILL

    assert code == 0
    assert group_members(group) == []
    assert group_members(worker.proc.pid) == []
    assert "sending SIGKILL" in worker.log()


# ------------------------------------------------------------------ start-up --

@pytest.mark.parametrize(("overrides", "cause"), [
    ({"MODEL_PATH": "/nonexistent/tiny-model", "FAILED_START_SECONDS": "0"},
     "Start-up failed: MODEL_PATH=/nonexistent/tiny-model does not exist."),
    ({"GPU_MEMORY_UTILIZATION": "1.5"},
     "Invalid setting: GPU_MEMORY_UTILIZATION='1.5' is not valid"),
    ({"FAKE_VLLM_EXIT_AFTER": "0", "FAKE_VLLM_EXIT_CODE": "3"},
     "Start-up failed: vLLM exited with code 3 during start-up."),
], ids=["model-path-missing", "invalid-setting", "vllm-exits"])
def test_start_up_failure_exits_non_zero_naming_the_cause_before_taking_jobs(
        launch: Callable[..., Worker], platform: Platform,
        overrides: dict[str, str], cause: str) -> None:
    """A worker that cannot serve must say why and never take a job it would fail."""
    worker = launch(**overrides)

    code = worker.exit_code(timeout=20)

    assert code != 0
    log = worker.log()
    assert cause in log
    assert "Traceback" not in log
    assert platform.takes == 0
    assert platform.pings == []
    if "FAKE_VLLM_EXIT_AFTER" in overrides:
        assert "RuntimeError: simulated start-up failure (exit code 3)" in log
        assert group_members(worker.vllm_group()) == []


def test_a_start_up_failure_for_good_fails_each_job_with_its_reason_then_exits(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A worker that would fail the same way on every restart tells the jobs waiting for it,
    for FAILED_START_SECONDS, and ends its log with the reason."""
    worker = launch(MODEL_PATH="/nonexistent/tiny-model", FAILED_START_SECONDS="4")
    jobs = [platform.queue_job({"messages": [{"role": "user", "content": "hi"}]})
            for _ in range(2)]
    results = [platform.result(job, timeout=20) for job in jobs]
    code = worker.exit_code(timeout=20)
    for result in results:
        error = json.loads(result["error"])["error"]
        assert error["code"] == 503
        assert error["message"] == ("The worker could not start: MODEL_PATH=/nonexistent/"
                                    "tiny-model does not exist.")
    assert code == 1
    last = worker.log().strip().splitlines()[-1]
    assert last.endswith("Exiting: MODEL_PATH=/nonexistent/tiny-model does not exist.")
    assert "Traceback" not in worker.log()


def test_sigterm_while_vllm_loads_stops_it_too(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """Scale-downs often come while vLLM loads for minutes: it must not be left running."""
    worker = launch(FAKE_VLLM_HEALTHY_AFTER="60", FAKE_VLLM_GRANDCHILD="obey")
    group = worker.vllm_group()
    wait_until(lambda: len(group_members(group)) == 3, 5, "the stand-in's engine core", worker)

    worker.proc.send_signal(signal.SIGTERM)
    code = worker.exit_code(timeout=10)

    assert code == 0
    assert group_members(group) == []
    assert group_members(worker.proc.pid) == []
    assert platform.takes == 0


# ------------------------------------------------------------------- secrets --

def test_hf_token_appears_in_no_log_and_no_post(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """The token reaches vLLM through the environment only: never a log line or the platform."""
    token = "hf_" + os.urandom(16).hex()
    worker = serving(launch(HF_TOKEN=token, FAKE_VLLM_PRINT_ENV="HF_TOKEN"), platform)
    jobs = [
        platform.queue_job({"openai_route": "/v1/chat/completions", "openai_input": CHAT}),
        platform.queue_job({"openai_route": "/v1/chat/completions",
                            "openai_input": {**CHAT, "stream": True}}),
        platform.queue_job({"openai_route": "/v1/chat/completions",
                            "openai_input": {**CHAT, "model": "other"}}),
        platform.queue_job({"openai_route": "/collective_rpc", "openai_input": {}}),
    ]
    for job_id in jobs:
        platform.result(job_id)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.exit_code(timeout=10) == 0

    log = worker.log()
    assert token not in log
    assert "[vllm] INFO fake vllm: environment HF_TOKEN=***" in log, "printed, and masked"
    assert not [text for text in platform.received if token in text]
    assert len(platform.received) > len(jobs)


def test_an_api_key_in_extra_args_is_sent_on_the_workers_own_requests(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """vLLM's /health is not behind its --api-key: a worker that did not send the key would
    look healthy and answer 401 to every job."""
    key = "vllm-own-key-" + os.urandom(8).hex()
    worker = serving(launch(VLLM_EXTRA_ARGS=f"--api-key {key}"), platform)
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions", "openai_input": CHAT})

    result = platform.result(job_id)

    assert result["output"][0]["object"] == "chat.completion"
    assert key not in worker.log(), "the key is a secret: never logged"
    assert "--api-key '***'" in worker.log()
