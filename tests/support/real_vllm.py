"""The real vLLM (CPU build) for the end-to-end tests: its environment, its processes, and
the worker's servers in front of it as `make run` (the local endpoint) and `make run-lb`
(the load-balancing server) start them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fakes.vllm import free_port
from worker.upstream.child import group_members

REPO = Path(__file__).resolve().parents[2]
# Real starts that test something else than the compile: vLLM compiles nothing (30 s of
# two cores saved per start; vLLM's compile cache is keyed by the model's path, which
# differs between the tests' "volumes", so no start would find another's).
NO_COMPILE = {"ENFORCE_EAGER": "true"}
# Starts that do not test where the cache goes share one cache folder (vLLM's default of
# this user): there vLLM finds what it learnt of the model's class at the first start (its
# "modelinfos"); in a new folder it inspects the class again, 12 s of a core per start.
SHARED_CACHE = {"VLLM_CACHE_ROOT": str(Path.home() / ".cache" / "vllm")}


LOCAL_KEY = "local-test-key-0123"
HELLO = [{"role": "user", "content": "Hello there"}]


@dataclass
class RealEndpoint:
    """A server of the worker's (`kind`: the local endpoint, or the load-balancing server)
    in front of a real vLLM (CPU build) serving the tiny model."""

    url: str  # the local endpoint's /v2/<id> base, or the load-balancing server's root
    api_key: str
    vllm_url: str
    model: str
    log: Path
    process: subprocess.Popen[bytes]
    kind: str = "local"
    pings: list[int | None] = field(default_factory=list)  # what /ping said while starting

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def openai_base(self) -> str:
        """The base URL OpenAI clients are given."""
        return f"{self.url}/openai/v1" if self.kind == "local" else f"{self.url}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"{self.url}/openai" if self.kind == "local" else self.url

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


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


def real_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What the end-to-end servers run with: the tiny model offline with the Makefile's
    defaults (its context long enough for OpenWebUI's built-in tools), some vLLM flags by
    their names, a secret to keep."""
    return {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
            "MAX_NUM_SEQS": "8", "ENABLE_PREFIX_CACHING": "false",
            "VLLM_STARTUP_TIMEOUT": "400", "HF_TOKEN": "hf_e2e_secret_token_value", **extra}


@contextlib.contextmanager
def spawned(target: str, tmp: Path, kind: str, **env: str) -> Iterator[RealEndpoint]:
    """`make <target>` in its own process group; on exit SIGTERM, and every process of it,
    vLLM's included (a second model's on the next port), must be gone."""
    port, vllm_port = free_port(), free_port(2)
    log = tmp / f"{target}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["make", "-s", target, f"PORT={port}"], cwd=REPO, stdout=sink,
            stderr=subprocess.STDOUT, process_group=0,
            env=real_env(tmp, VLLM_PORT=str(vllm_port), **env))
    url = f"http://127.0.0.1:{port}" + ("/v2/local" if kind == "local" else "")
    served = RealEndpoint(url, LOCAL_KEY, f"http://127.0.0.1:{vllm_port}", "tiny-chat", log,
                          process, kind)
    try:
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        process.wait()
        leftovers = [*group_members(process.pid), *vllm_processes(vllm_port),
                     *vllm_processes(vllm_port + 1)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes left after SIGTERM: {leftovers}"


def wait_ready(*waits: tuple[RealEndpoint, Callable[[RealEndpoint], bool]]) -> None:
    """Poll each server until its `ready` says so (they load side by side meanwhile)."""
    deadline = time.monotonic() + 900
    pending = list(waits)
    while pending := [(served, ready) for served, ready in pending if not ready(served)]:
        for served, _ in pending:
            if served.process.poll() is not None:
                pytest.fail(f"`make` ({served.log.name}) exited ({served.process.returncode})"
                            f":\n{served.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"`make` ({served.log.name}) did not start:\n"
                            f"{served.log_text()[-4000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def make_target(target: str, tmp: Path, kind: str, ready: Callable[[RealEndpoint], bool],
                **env: str) -> Iterator[RealEndpoint]:
    """`make <target>` (see `spawned`), once `ready`."""
    with spawned(target, tmp, kind, **env) as served:
        wait_ready((served, ready))
        yield served


def health_200(served: RealEndpoint) -> bool:
    """The local endpoint answers its /health (it listens once vLLM is healthy)."""
    try:
        return httpx.get(f"{served.url}/health", headers=served.headers).status_code == 200
    except httpx.TransportError:
        return False


def ping_200(served: RealEndpoint) -> bool:
    """The load-balancing server's /ping says 200, remembering what it said before."""
    try:
        status: int | None = httpx.get(f"{served.url}/ping", timeout=5).status_code
    except httpx.TransportError:
        status = None
    served.pings.append(status)
    return status == 200


def real_vllm_env(port: int, **overrides: str) -> dict[str, str]:
    """What `make run` gives vLLM on a CPU, for the tiny model, without the compile."""
    return {"VLLM_PYTHON": real_vllm_python(), "VLLM_PORT": str(port),
            "MODEL_PATH": os.environ.get("TINY_MODEL_PATH", str(REPO / ".models" / "tiny-chat")),
            "HF_HUB_OFFLINE": "1", "GPU_MEMORY_UTILIZATION": "0.3",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
            "VLLM_EXTRA_ARGS": "--no-enable-chunked-prefill", "VLLM_STARTUP_TIMEOUT": "600",
            **NO_COMPILE, **SHARED_CACHE, **overrides}
