"""Shared fixtures: a scriptable vLLM (pytest-httpserver) and the handler's proxy pointed at it,
the stand-in vLLM (fakes.vllm) as a process of its own, the fake job API (fakes.platform)
with workers under it, and the local endpoint in front of a real vLLM for the end-to-end
tests."""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from fakes.platform import Platform
from fakes.vllm import free_port
from support import SERVED, StandIn, proxy_to
from support.real_vllm import (
    LOCAL_KEY,
    NO_COMPILE,
    REPO,
    SHARED_CACHE,
    RealEndpoint,
    health_200,
    ping_200,
    spawned,
    wait_ready,
)
from support.workers import Worker, kill_worker, start_worker
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing


@pytest.fixture(scope="session")
def fake_vllm_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_vllm(fake_vllm_server: HTTPServer) -> Iterator[HTTPServer]:
    """A threaded fake vLLM on loopback (slow streams do not block other calls), fresh per test."""
    fake_vllm_server.clear()
    yield fake_vllm_server
    fake_vllm_server.clear()


@pytest.fixture
def proxy(fake_vllm: HTTPServer) -> Proxy:
    """A proxy to the fake vLLM, as the handler's."""
    return proxy_to(fake_vllm, request_timeout=5, pacing=Pacing(0))


@pytest.fixture(scope="session")
def real_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RealEndpoint]]:
    """`make run` and `make run-lb`, as the README says, once per session, spawned together
    so that their vLLMs load side by side; stopped with SIGTERM at the end, leaving no vLLM process.

    The local endpoint runs without the compile (test_compile_cache.py covers it). The
    load-balancing server's "volume" cannot hold the compile cache (a file stands where the
    folder would be: root writes through permissions), so vLLM keeps its default one;
    test_load_balancer.py ends it last, with SIGTERM during streams."""
    blocked = tmp_path_factory.mktemp("real-lb")
    (blocked / "vllm-cache").write_text("not a folder")
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(spawned(
            "run", tmp_path_factory.mktemp("real-endpoint"), "local", LOCAL_API_KEY=LOCAL_KEY,
            **NO_COMPILE, **SHARED_CACHE))
        lb = stack.enter_context(spawned("run-lb", blocked, "lb", API_KEY=LOCAL_KEY,
                                         SHUTDOWN_GRACE_PERIOD="3", VLLM_CACHE_ROOT="",
                                         **NO_COMPILE))
        wait_ready((local, health_200), (lb, ping_200))
        yield {"local": local, "lb": lb}


@pytest.fixture(scope="session")
def real_endpoint(real_servers: dict[str, RealEndpoint]) -> RealEndpoint:
    """The local endpoint in front of a real vLLM."""
    return real_servers["local"]


@pytest.fixture(scope="session")
def real_lb(real_servers: dict[str, RealEndpoint]) -> RealEndpoint:
    """The load-balancing server in front of its own real vLLM."""
    return real_servers["lb"]


@pytest.fixture(scope="session", params=["local", "lb"])
def served(request: pytest.FixtureRequest) -> RealEndpoint:
    """Each server clients talk to, in front of a real vLLM: the local endpoint's OpenAI
    path, and the load-balancing server."""
    return request.getfixturevalue("real_servers")[request.param]


@pytest.fixture(scope="session")
def stand_in_server() -> Iterator[StandIn]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fakes.vllm", "--port", str(port), "--served-model-name", SERVED,
         "--disable-uvicorn-access-log"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: collections.deque[str] = collections.deque(maxlen=200)
    for line in process.stdout:  # until it listens (its "Uvicorn running" line)
        lines.append(line)
        if "Uvicorn running on" in line:
            break
    else:
        pytest.fail(f"the stand-in vLLM exited ({process.wait()}):\n{''.join(lines)}")
    threading.Thread(target=lines.extend, args=(process.stdout,), daemon=True).start()
    try:
        yield StandIn(f"http://127.0.0.1:{port}", process, lines)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.fixture
def stand_in(stand_in_server: StandIn) -> StandIn:
    """The stand-in with its counters zeroed and nothing left open by an earlier test."""
    stand_in_server.wait_for(lambda s: s["streams"] == 0, 10, "no open stream")
    stand_in_server.reset()
    return stand_in_server


@pytest.fixture
def job_platform() -> Iterator[Platform]:
    """The fake job API, failing the test at teardown on any request it did not expect."""
    with Platform() as made:
        yield made
    made.check()


@pytest.fixture
def start_workers(tmp_path: Path, job_platform: Platform) -> Iterator[Callable[..., Worker]]:
    """`python handler.py` under the fake job API, stand-in vLLM as its child; every process
    a worker left is SIGKILLed when the test ends."""
    workers: list[Worker] = []

    def start(**overrides: str) -> Worker:
        worker = start_worker(tmp_path / f"worker-{len(workers)}", job_platform, **overrides)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        kill_worker(worker)
