"""Shared fixtures: a fake vLLM (pytest-httpserver), the handler's proxy pointed at it, and
the local endpoint in front of a real vLLM for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer

import handler
from proxy import Proxy
from relay import Pacing
from routes import Target
from supervisor import group_members
from support import SERVED


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
def proxy(fake_vllm: HTTPServer) -> Iterator[Proxy]:
    """The handler's proxy, pointed at the fake vLLM."""
    made = handler.configure(Proxy(Target(SERVED, fake_vllm.url_for("/").rstrip("/")),
                                   request_timeout=5, pacing=Pacing(0)))
    yield made
    handler.configure(None)  # type: ignore[arg-type]


REPO = Path(__file__).resolve().parent.parent
LOCAL_KEY = "local-test-key-0123"


@dataclass
class RealEndpoint:
    """The local endpoint in front of a real vLLM (CPU build) serving the tiny model."""

    url: str
    api_key: str
    vllm_url: str
    model: str
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def real_vllm_python() -> str:
    """The Python of vLLM's own environment (`make test` sets it up)."""
    python = os.environ.get("VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    if not Path(python).exists():
        pytest.fail(f"vLLM's environment is missing ({python}); `make test` sets it up.")
    return python


def vllm_processes(port: int) -> list[int]:
    """PIDs of processes whose command line serves on `port` (the vLLM child)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and b"vllm" in b" ".join(argv):
            found.append(int(entry))
    return found


@pytest.fixture(scope="session")
def real_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEndpoint]:
    """`make run`, as the README says, started once per session (vLLM loads in about a
    minute on two cores); stopped with SIGTERM at the end, leaving no vLLM process."""
    tmp = tmp_path_factory.mktemp("real-endpoint")
    port, vllm_port = free_port(), free_port()
    env = {**os.environ, "VLLM_PORT": str(vllm_port), "HF_HOME": str(tmp / "hf"),
           "HF_HUB_OFFLINE": "1", "LOCAL_API_KEY": LOCAL_KEY, "MAX_MODEL_LEN": "32768",
           "VLLM_STARTUP_TIMEOUT": "400", "HF_TOKEN": "hf_e2e_secret_token_value"}
    log = tmp / "endpoint.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=REPO, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = RealEndpoint(f"http://127.0.0.1:{port}/v2/local", LOCAL_KEY,
                            f"http://127.0.0.1:{vllm_port}", "tiny-chat", log, process)
    try:
        deadline = time.monotonic() + 900
        while True:
            if process.poll() is not None:
                pytest.fail(f"`make run` exited ({process.returncode}):\n"
                            f"{endpoint.log_text()[-4000:]}")
            try:
                if httpx.get(f"{endpoint.url}/health", headers=endpoint.headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"The local endpoint did not start:\n{endpoint.log_text()[-4000:]}")
            time.sleep(0.5)
        yield endpoint
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        process.wait()
        leftovers = group_members(process.pid) + vllm_processes(vllm_port)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left after SIGTERM: {leftovers}"
