"""The faults that a real vLLM can be made to meet on cue, on the CPU build with the tiny model.

`python handler.py` under the fake job API (fakes.platform), with the real
vLLM as its child: SIGKILLed mid-stream, SIGTERMed while streaming, never healthy in
time, dying at start-up on a mistyped secret flag. What is left running is read from
/proc: vLLM's engine core is a grandchild in the same process group, the process that
outlives a killed API server and keeps the (GPU) memory.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes.platform import Platform
from fakes.vllm import free_port
from support.real_vllm import HELLO, real_vllm_env, vllm_processes
from support.workers import kill_worker, sse_data, start_worker, wait_until
from worker.upstream.child import group_members


def vllm_server(port: int) -> tuple[int, int]:
    """The API server's pid and its process group (led by the guard that started it)."""
    servers = [pid for pid in vllm_processes(port) if os.getpgid(pid) != pid]
    assert len(servers) == 1, servers
    return servers[0], os.getpgid(servers[0])


class RealWorker:
    def __init__(self, directory: Path) -> None:
        self.platform = Platform()
        self.platform.start()
        self.port = free_port()
        self.worker = start_worker(directory, self.platform, **real_vllm_env(self.port))

    def close(self) -> None:
        pids = vllm_processes(self.port)
        kill_worker(self.worker)
        for pgid in {os.getpgid(pid) for pid in pids if group_members(pid)}:
            os.killpg(pgid, signal.SIGKILL)
        self.platform.stop()


@pytest.fixture
def real_worker(tmp_path: Path) -> Iterator[RealWorker]:
    """A worker serving on the real vLLM (one at a time: two loading vLLMs would starve
    each other and everything else on a small machine)."""
    made = RealWorker(tmp_path)
    try:
        wait_until(lambda: made.platform.takes > 0, 900, "the first job-take", made.worker)
        yield made
    finally:
        made.close()


def chat(**body: object) -> dict[str, object]:
    return {"openai_route": "/v1/chat/completions",
            "openai_input": {"messages": HELLO, "ignore_eos": True, **body}}


def test_real_vllm_killed_mid_stream_fails_jobs_clearly_and_leaves_no_engine_core(
        real_worker: RealWorker) -> None:
    real = real_worker
    platform, worker = real.platform, real.worker
    server, leader = vllm_server(real.port)
    members = group_members(leader)
    assert len(members) >= 3, "the guard, the API server and its engine core"
    streaming = platform.queue_job(chat(max_tokens=7000, stream=True))
    platform.wait(lambda: platform.streams.get(streaming), 60, "the stream's first post")
    waiting = platform.queue_job(chat(max_tokens=7000))
    wait_until(lambda: f"job {waiting}: POST /v1/chat/completions" in worker.log(), 30,
             "the second request sent to vLLM")
    platform.hold_stream_posts()
    platform.wait(lambda: platform.held_stream_posts, 10, "a stream post to hold")

    os.kill(server, signal.SIGKILL)
    killed = time.monotonic()
    later = platform.queue_job(chat(max_tokens=5))
    later_result, waiting_result = platform.result(later), platform.result(waiting)
    platform.release_stream_posts()
    streamed = platform.result(streaming)
    code = worker.exit_code(timeout=15)
    took = time.monotonic() - killed

    assert code != 0
    assert took < 5, f"the worker took {took:.1f} s to exit"
    assert group_members(leader) == [], f"of {members}, vLLM processes survived"
    assert vllm_processes(real.port) == []
    for result in (later_result, waiting_result):
        error = json.loads(result["error"])["error"]
        assert error["code"] == 503 and "killed by SIGKILL" in error["message"]
    data = sse_data(streamed["output"][-1])
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == 503 and "killed by SIGKILL" in error["message"]


def test_real_vllm_sigterm_lets_the_stream_finish_then_stops_every_vllm_process(
        real_worker: RealWorker) -> None:
    real = real_worker
    platform, worker = real.platform, real.worker
    _, leader = vllm_server(real.port)
    assert len(group_members(leader)) >= 3
    job_id = platform.queue_job(chat(max_tokens=400, stream=True,
                                     stream_options={"include_usage": True}))
    platform.wait(lambda: platform.streams.get(job_id), 60, "the stream's first post")

    worker.proc.send_signal(signal.SIGTERM)
    result = platform.result(job_id, timeout=60)
    code = worker.exit_code(timeout=60)

    data = sse_data("".join(result["output"]))
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 400, "the whole answer"
    assert code == 0
    assert group_members(leader) == [] and vllm_processes(real.port) == []
    assert group_members(worker.proc.pid) == []


def test_real_vllm_not_healthy_in_time_ends_the_worker_with_its_last_lines(
        tmp_path: Path, job_platform: Platform) -> None:
    port = free_port()
    platform = job_platform
    # vLLM's CPU build takes longer than this to import and load, yet prints lines first.
    worker = start_worker(tmp_path, platform, **real_vllm_env(port, VLLM_STARTUP_TIMEOUT="12"))
    try:
        started = time.monotonic()
        code = worker.exit_code(timeout=90)
        took = time.monotonic() - started
        log = worker.log()
        assert code == 1
        assert took < 12 + 15, f"{took:.0f} s: the timeout, then vLLM's stop"
        assert "Start-up failed: vLLM was not healthy after 12 s (VLLM_STARTUP_TIMEOUT)." in log
        # vLLM's lines are quoted when it printed any by then, however fast it is today.
        printed = "[vllm] " in log
        assert ("Its last lines:\n" in log) == printed
        assert ("It printed nothing." in log) == (not printed)
        assert vllm_processes(port) == [] and group_members(worker.proc.pid) == []
        assert platform.takes == 0
    finally:
        kill_worker(worker)


def test_real_vllm_refusing_a_mistyped_secret_flag_is_reported_without_the_secret(
        tmp_path: Path, job_platform: Platform) -> None:
    """vLLM's argparse quotes unknown arguments back: the reason is shown, the value masked."""
    secret = "sk-" + os.urandom(12).hex()
    port = free_port()
    platform = job_platform
    worker = start_worker(tmp_path, platform, FAILED_START_SECONDS="0", **real_vllm_env(
        port, VLLM_EXTRA_ARGS=f"--no-enable-chunked-prefill --api-keys={secret}"))
    try:
        code = worker.exit_code(timeout=180)
        log = worker.log()
        assert code == 1
        assert "Start-up failed: vLLM exited with code 2 during start-up." in log
        assert "unrecognized arguments: --api-keys=***" in log
        assert secret not in log
        assert vllm_processes(port) == [] and group_members(worker.proc.pid) == []
        assert platform.takes == 0
    finally:
        kill_worker(worker)


def test_real_vllm_killed_mid_stream_of_the_load_balancing_server(tmp_path: Path) -> None:
    """The client gets an in-band error, /ping stops saying 200, the worker exits non-zero,
    and nothing of vLLM is left."""
    port, vllm_port = free_port(), free_port()
    worker = start_worker(tmp_path, None, PORT=str(port), **real_vllm_env(vllm_port))
    url = f"http://127.0.0.1:{port}"

    def ping() -> int | None:
        try:
            return httpx.get(f"{url}/ping", timeout=5).status_code
        except httpx.TransportError:
            return None

    try:
        wait_until(lambda: ping() == 200, 900, "/ping 200", worker)
        body = {"model": "tiny-chat", "messages": HELLO, "max_tokens": 7000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=60) as answer:
            assert answer.status_code == 200, answer.read()
            chunks = answer.iter_raw()
            first = next(chunks)
            _, leader = vllm_server(vllm_port)
            os.killpg(leader, signal.SIGKILL)
            text = (first + b"".join(chunks)).decode()
            after = ping()
        events = sse_data(text)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "SIGKILL" in error["message"]
        assert after != 200
        assert worker.exit_code(timeout=30) != 0
        assert vllm_processes(vllm_port) == [] and group_members(worker.proc.pid) == []
    finally:
        kill_worker(worker)
