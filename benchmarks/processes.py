"""The processes a scenario runs beside itself: the stand-in vLLM (fakes.vllm), the local
endpoint, the load-balancing server (`python handler.py` with PORT), a real vLLM.

Each is a context manager that starts the process in its own process group, waits until it
answers, and on exit stops its whole process group (SIGTERM, a bounded wait, SIGKILL).
Their output goes to a log file in the run's work folder, quoted when they fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from fakes.vllm import free_port

PROJECT = Path(__file__).resolve().parent.parent
SERVED = "bench-model"


def base_env(**settings: str) -> dict[str, str]:
    """A clean environment (no worker or vLLM variables inherited) plus `settings`."""
    kept = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TERM")
    return {**{k: os.environ[k] for k in kept if k in os.environ}, **settings}


class Process:
    """A child process in its own process group, logged to `log`."""

    def __init__(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, dict(env or os.environ)
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.launched = time.monotonic()
            self.proc = subprocess.Popen(self.argv, cwd=PROJECT, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=sink,
                                         stderr=subprocess.STDOUT, process_group=0)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_http(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        """Poll `url` until it answers 200; RuntimeError quoting the log otherwise."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log.stem} exited ({self.proc.returncode}):\n"
                                   f"{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # anything it left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()


def upstream(work: Path, name: str = "upstream", core: int | None = None
             ) -> tuple[Process, str]:
    """The stand-in vLLM on a free port (pinned to `core` if given), answering; and its base
    URL. It runs from the project root (Process's cwd), where `fakes` is; no access log, as
    it would only cost it CPU."""
    port = free_port()
    process = Process(on_core([sys.executable, "-m", "fakes.vllm", "--port", str(port),
                               "--served-model-name", SERVED, "--disable-uvicorn-access-log"],
                              core),
                      work / f"{name}.log", base_env())
    process.start()
    url = f"http://127.0.0.1:{port}"
    process.wait_http(f"{url}/health", 30)
    return process, url


def on_core(argv: list[str], core: int | None) -> list[str]:
    """`argv` pinned to one CPU core with taskset (None: not pinned)."""
    return argv if core is None else ["taskset", "-c", str(core), *argv]


def pin_threads(cores: set[int]) -> set[int]:
    """Every thread of this process onto `cores` (threads started later inherit it from
    theirs); the cores it had before."""
    before = os.sched_getaffinity(0)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cores)
    return before


def local_endpoint(work: Path, env: Mapping[str, str], name: str = "endpoint",
                   timeout: float = 60, core: int | None = None) -> tuple[Process, str]:
    """`local_endpoint.py` with `env` (over a clean one), answering; its /v2/<id> base."""
    port = free_port()
    process = Process(on_core([sys.executable, "local_endpoint.py", "--port", str(port)], core),
                      work / f"{name}.log", base_env(**env))
    process.start()
    base = f"http://127.0.0.1:{port}/v2/bench"
    key = env.get("LOCAL_API_KEY")
    process.wait_http(f"{base}/health", timeout,
                      {"Authorization": f"Bearer {key}"} if key else None)
    return process, base


def lb_server(work: Path, env: Mapping[str, str], name: str = "lb-server",
              timeout: float = 60, core: int | None = None) -> tuple[Process, str]:
    """The load-balancing server (`python handler.py`, PORT set, no job queue) with `env`
    over a clean one, its /ping answering 200; its base URL."""
    port = free_port()
    process = Process(on_core([sys.executable, "handler.py"], core), work / f"{name}.log",
                      base_env(**env, PORT=str(port)))
    process.start()
    base = f"http://127.0.0.1:{port}"
    process.wait_http(f"{base}/ping", timeout)
    return process, base


def vllm_python() -> str:
    return os.environ.get("VLLM_PYTHON", str(PROJECT / ".venv-vllm" / "bin" / "python"))


def tiny_model() -> Path:
    return Path(os.environ.get("TINY_MODEL_PATH", str(PROJECT / ".models" / "tiny-chat")))


def vllm_server(work: Path, core: int | None, timeout: float = 600) -> tuple[Process, str]:
    """vLLM's CPU build on the tiny model, started as the worker starts it (its command line
    as the worker logs it, with prefix caching off so repeated prompts cost the same), all
    its threads on `core` (taskset, VLLM_CPU_OMP_THREADS_BIND, no reserved CPU), answering
    /health; its base URL. The served name is the model folder's name."""
    port = free_port()
    model = tiny_model()
    argv = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model.name,
            "--gpu-memory-utilization", "0.3", "--max-model-len", "8192", "--dtype", "bfloat16",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--no-enable-chunked-prefill", "--no-enable-prefix-caching"]
    pinning = {} if core is None else {"VLLM_CPU_OMP_THREADS_BIND": str(core),
                                       "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    process = Process(on_core(argv, core), work / "vllm.log",
                      base_env(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                               HF_HOME=str(work / "hf-home"), **pinning))
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_http(f"{url}/health", timeout)
    except BaseException:
        process.stop()
        raise
    return process, url


def external_env(upstream_url: str, **extra: str) -> dict[str, str]:
    """The worker's settings for a vLLM it does not start (VLLM_BASE_URL)."""
    return {"VLLM_BASE_URL": upstream_url, "MODEL_NAME": SERVED, "MAX_CONCURRENCY": "512",
            "VLLM_STARTUP_TIMEOUT": "30", **extra}


def reference_proxy(work: Path, vllm_url: str, core: int | None) -> tuple[Process, str]:
    """The throwaway ten-line proxy (reference_proxy.py) to `vllm_url`, answering; its URL."""
    port = free_port()
    process = Process(on_core([sys.executable, "-m", "uvicorn", "benchmarks.reference_proxy:app",
                               "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                               "--log-level", "warning"], core),
                      work / "reference-proxy.log", base_env(UPSTREAM=vllm_url))
    process.start()
    base = f"http://127.0.0.1:{port}"
    process.wait_http(f"{base}/ping", 30)
    return process, base


def reference_splice(work: Path, vllm_url: str, core: int | None) -> tuple[Process, str]:
    """The byte splice (reference_splice.py) to `vllm_url`, accepting; its URL."""
    port = free_port()
    upstream = vllm_url.rsplit(":", 1)[1].split("/")[0]
    process = Process(on_core([sys.executable, "-m", "benchmarks.reference_splice", upstream,
                               str(port)], core), work / "reference-splice.log", base_env())
    process.start()
    base = f"http://127.0.0.1:{port}"
    process.wait_http(f"{base}/health", 30)  # vLLM's own /health, through the splice
    return process, base
