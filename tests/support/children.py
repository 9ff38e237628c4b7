"""Stand-in vLLM children for the upstream tests: started with the argv the worker really
builds (through a launcher passed as VLLM_PYTHON), and killed, group and all, afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from worker.upstream.child import VllmChild, group_members

MODEL = "/models/tiny-model"
SERVED = "test-org/tiny-model"


@dataclass
class Started:
    child: VllmChild
    url: str


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group and wait until /proc shows none of it (test clean-up)."""
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
