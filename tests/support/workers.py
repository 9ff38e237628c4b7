"""The worker as deployments run it, for the tests: `python handler.py` as a process of
its own group, under the fake job API (fakes.platform), with the stand-in vLLM
(fakes.vllm) as its child; what it logged, and what it left running (read from /proc)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fakes.platform import Platform
from fakes.vllm import free_port, write_launcher
from worker.upstream.child import group_members

PROJECT = Path(__file__).resolve().parents[2]


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


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    directory: Path
    log_file: BinaryIO

    def log(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")

    def _vllm_ids(self) -> list[int]:
        pid_file = self.directory / "vllm.pid"
        wait_until(pid_file.exists, 10, "the stand-in's pid")
        return [int(word) for word in pid_file.read_text().split()]

    def vllm_pid(self) -> int:
        """The stand-in's pid."""
        return self._vllm_ids()[0]

    def vllm_group(self) -> int:
        """The stand-in's process group: its guard's pid (the guard, the stand-in and its
        engine core are its members)."""
        return self._vllm_ids()[1]

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


def start_worker(directory: Path, platform: Platform | None, *command: str,
                 **overrides: str) -> Worker:
    """`python handler.py` in its own process group, with its output in worker.log: a queue
    worker under `platform`, or with none (and PORT among the overrides) a load-balancing
    one; or another `command` of the project's (the local endpoint) the same way."""
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
        **(platform.env() if platform is not None else {}),
        **overrides,
    }
    log_file = (directory / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, *(command or ("handler.py",))], cwd=PROJECT, env=env,
                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            process_group=0)
    return Worker(proc, directory, log_file)


def _groups_of_children(pid: int) -> list[int]:
    """The process groups of `pid`'s children (each vLLM has a group of its own)."""
    groups = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if int(fields[1]) == pid:
                groups.append(int(fields[2]))
    return groups


def kill_worker(worker: Worker) -> None:
    """SIGKILL the worker's group and its stand-ins' groups (found as its children, and from
    the pid file); reap (clean-up, also on failure)."""
    groups = [worker.proc.pid, *_groups_of_children(worker.proc.pid)]
    pid_file = worker.directory / "vllm.pid"
    if pid_file.exists():
        groups.append(int(pid_file.read_text().split()[1]))
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
