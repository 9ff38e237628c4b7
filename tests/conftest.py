"""Shared fixtures: a fake vLLM (pytest-httpserver), the handler's proxy pointed at it, and
the local endpoint in front of a real vLLM for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    made = handler.configure(Proxy(fake_vllm.url_for("/").rstrip("/"), SERVED,
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


def real_endpoint_env(tmp: Path, vllm_port: int) -> dict[str, str]:
    vllm_python = os.environ.get("VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))
    model = os.environ.get("TINY_MODEL_PATH", str(REPO / ".models" / "tiny-chat"))
    missing = [p for p in (vllm_python, f"{model}/config.json") if not Path(p).exists()]
    if missing:
        pytest.fail(f"The end-to-end tests need vLLM's CPU build and the tiny model, missing: "
                    f"{missing}. `make test` sets both up.")
    return {**os.environ, "MODEL_PATH": model, "VLLM_PYTHON": vllm_python,
            "VLLM_PORT": str(vllm_port), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
            "GPU_MEMORY_UTILIZATION": "0.3", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_EXTRA_ARGS": "--no-enable-chunked-prefill", "LOCAL_API_KEY": LOCAL_KEY,
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "MAX_MODEL_LEN": "32768",
            "VLLM_STARTUP_TIMEOUT": "400", "HF_TOKEN": "hf_e2e_secret_token_value"}


@pytest.fixture(scope="session")
def real_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEndpoint]:
    """Started once per session (vLLM takes about a minute to load on two cores)."""
    tmp = tmp_path_factory.mktemp("real-endpoint")
    port, vllm_port = free_port(), free_port()
    env = real_endpoint_env(tmp, vllm_port)
    log = tmp / "endpoint.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "local_endpoint.py"), "--port", str(port)],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    endpoint = RealEndpoint(f"http://127.0.0.1:{port}/v2/local", LOCAL_KEY,
                            f"http://127.0.0.1:{vllm_port}", Path(env["MODEL_PATH"]).name, log,
                            process)
    try:
        deadline = time.monotonic() + 420
        while True:
            if process.poll() is not None:
                pytest.fail(f"The local endpoint exited ({process.returncode}):\n"
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
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
