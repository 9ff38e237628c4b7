"""The whole worker as deployments run it: `python handler.py` against a fake platform.

The worker is a real subprocess with the Runpod SDK pointed at the fake job API
(fakes.platform) and the stand-in vLLM (fakes.vllm) as its child, so what
is asserted is what the platform receives after the SDK transformed the
handler's output, and what is left running after the worker ends (read from
/proc). Every process group a test starts is SIGKILLed when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fakes.platform import Platform
from fakes.vllm import free_port, write_launcher
from supervisor import group_members

PROJECT = Path(__file__).resolve().parent.parent
WORKER_ID = "test-worker"
SERVED = "tiny-model"  # the name of the MODEL_PATH folder, served when MODEL_NAME is unset
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               worker: Worker | None = None) -> None:
    """Poll `condition` until true; fail naming `what` (and the worker's log) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if worker is not None and worker.proc.poll() is not None:
            pytest.fail(f"the worker exited ({worker.proc.returncode}) while waiting for {what}:"
                        f"\n{worker.log()}")
        if time.monotonic() > deadline:
            log = f":\n{worker.log()}" if worker is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{log}")
        time.sleep(0.02)


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE text, in order."""
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


# ----------------------------------------------------------------- the worker --

@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    directory: Path
    log_file: BinaryIO

    def log(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")

    def vllm_pid(self) -> int:
        """The stand-in's pid, which is also its process group's id."""
        pid_file = self.directory / "vllm.pid"
        wait_until(pid_file.exists, 10, "the stand-in's pid")
        return int(pid_file.read_text())

    def vllm_requests(self) -> list[dict[str, Any]]:
        """What the stand-in served, health checks left out."""
        record = self.directory / "vllm-requests.jsonl"
        if not record.exists():
            return []
        lines = [json.loads(line) for line in record.read_text().splitlines()]
        return [r for r in lines if r["path"] != "/health"]

    def exit_code(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker was still running {timeout} s later:\n{self.log()}")


def model_folder(directory: Path) -> Path:
    """A folder the locator accepts: config.json and a (dummy) weights file."""
    folder = directory / "models" / SERVED
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def start_worker(directory: Path, platform: Platform, **overrides: str) -> Worker:
    """`python handler.py` in its own process group, with its output in worker.log."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # memory, disk and internet checks
        "RUNPOD_SKIP_GPU_CHECK": "true",
        "VLLM_PYTHON": write_launcher(directory),
        "VLLM_PORT": str(free_port()),
        "MODEL_PATH": str(model_folder(directory)),
        "HF_HOME": str(directory / "hf-home"),
        "VLLM_STARTUP_TIMEOUT": "30",
        "FAKE_VLLM_PID_FILE": str(directory / "vllm.pid"),
        "FAKE_VLLM_RECORD": str(directory / "vllm-requests.jsonl"),
        **platform.env(),
        **overrides,
    }
    log_file = (directory / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "handler.py"], cwd=PROJECT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            process_group=0)
    return Worker(proc, directory, log_file)


def kill_worker(worker: Worker) -> None:
    """SIGKILL the worker's group and the stand-in's group; reap (clean-up, also on failure)."""
    groups = [worker.proc.pid]
    pid_file = worker.directory / "vllm.pid"
    if pid_file.exists():
        groups.append(int(pid_file.read_text()))
    for pgid in groups:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(10)
    worker.log_file.close()


def serving(worker: Worker, platform: Platform) -> Worker:
    """Wait until the SDK asks for jobs, which it does only once vLLM is healthy."""
    wait_until(lambda: platform.takes > 0, 30, "the first job-take", worker)
    return worker


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
    wait_until(lambda: len(group_members(vllm)) == 2, 5, "the stand-in's engine core")
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
    assert group_members(vllm) == [], "the engine core must not outlive the worker"
    assert group_members(worker.proc.pid) == [], "nor the SDK's heartbeat process"
    assert set(later_result) == {"error"}
    assert json.loads(later_result["error"])["error"]["code"] == 503
    last = streamed["output"][-1]
    events = sse_data(last)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "SIGKILL" in error["message"]
    assert "killed by SIGKILL while serving" in worker.log()


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_zero(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A scale-down must not cut the answers being streamed; then nothing may be left running."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.05", FAKE_VLLM_GRANDCHILD="obey",
                            SHUTDOWN_GRACE_PERIOD="10"), platform)
    vllm = worker.vllm_pid()
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
    assert group_members(vllm) == []
    assert group_members(worker.proc.pid) == [], "nothing of the worker may be left either"


def test_sigterm_stops_within_the_grace_period_when_a_stream_outlasts_it(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """The platform SIGKILLs a worker that lingers: the grace period must bound the drain."""
    worker = serving(launch(FAKE_VLLM_TOKEN_DELAY="0.05", SHUTDOWN_GRACE_PERIOD="1"), platform)
    vllm = worker.vllm_pid()
    job_id = platform.queue_job({"openai_route": "/v1/chat/completions",
                                 "openai_input": {**CHAT, "max_tokens": 400, "stream": True}})
    platform.wait(lambda: platform.streams.get(job_id), 10, "the stream's first post")

    worker.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = worker.exit_code(timeout=10)

    assert code == 0
    assert 1 <= time.monotonic() - signalled < 5
    assert "job(s) still running after 1 s: stopping anyway" in worker.log()
    assert group_members(vllm) == []
    assert group_members(worker.proc.pid) == []


def test_sigterm_with_stubborn_vllm_still_leaves_no_process(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """A vLLM that ignores SIGTERM (engine core too) would keep the GPU: it is SIGKILLed."""
    worker = serving(launch(FAKE_VLLM_IGNORE_SIGTERM="1", FAKE_VLLM_GRANDCHILD="ignore-sigterm",
                            SHUTDOWN_GRACE_PERIOD="1"), platform)
    vllm = worker.vllm_pid()
    wait_until(lambda: len(group_members(vllm)) == 2, 5, "the stand-in's engine core")

    worker.proc.send_signal(signal.SIGTERM)
    code = worker.exit_code(timeout=30)  # vLLM gets 10 s after SIGTERM, then SIGKILL

    assert code == 0
    assert group_members(vllm) == []
    assert group_members(worker.proc.pid) == []
    assert "sending SIGKILL" in worker.log()


# ------------------------------------------------------------------ start-up --

@pytest.mark.parametrize(("overrides", "cause"), [
    ({"MODEL_PATH": "/nonexistent/tiny-model"},
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
        assert group_members(worker.vllm_pid()) == []


def test_sigterm_while_vllm_loads_stops_it_too(
        launch: Callable[..., Worker], platform: Platform) -> None:
    """Scale-downs often come while vLLM loads for minutes: it must not be left running."""
    worker = launch(FAKE_VLLM_HEALTHY_AFTER="60", FAKE_VLLM_GRANDCHILD="obey")
    vllm = worker.vllm_pid()
    wait_until(lambda: len(group_members(vllm)) == 2, 5, "the stand-in's engine core", worker)

    worker.proc.send_signal(signal.SIGTERM)
    code = worker.exit_code(timeout=10)

    assert code == 0
    assert group_members(vllm) == []
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
