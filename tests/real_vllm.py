"""The real vLLM (CPU build) for the end-to-end tests: its environment, its processes, and
the local endpoint in front of it as `make run` starts it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

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
