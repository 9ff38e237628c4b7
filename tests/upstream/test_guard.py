"""The guard vLLM runs under: out of the way while the worker lives (vLLM's exit is its own),
and the end of vLLM's whole group once the worker is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from support.children import wait_for
from worker.upstream.child import GUARD, group_members

SLEEPER = "import time\nwhile True: time.sleep(1)"
STUBBORN = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # an engine core that hangs on
            "subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(1)'])\n"
            "while True: time.sleep(1)")


@contextmanager
def guarded(code: str, grace: float = 1.0) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -c code` under the guard, in a group of its own, as child.py starts vLLM; the
    writing end of the guard's pipe (the worker's life)."""
    reader, writer = os.pipe()
    guard = subprocess.Popen([sys.executable, GUARD, str(reader), f"{grace:g}", sys.executable,
                              "-c", code], pass_fds=(reader,), process_group=0)
    os.close(reader)
    try:
        yield guard, writer
    finally:
        with contextlib.suppress(OSError):  # the test may have closed it already
            os.close(writer)
        if group_members(guard.pid):
            os.killpg(guard.pid, signal.SIGKILL)
        guard.wait()


@pytest.mark.parametrize(("code", "exit"), [("raise SystemExit(3)", 3), ("pass", 0),
                                            ("import os, signal; os.kill(os.getpid(), "
                                             "signal.SIGKILL)", -signal.SIGKILL)])
def test_the_guard_exits_as_vllm_did(code: str, exit: int) -> None:
    with guarded(code) as (guard, writer):
        assert guard.wait(20) == exit


def test_a_stop_signal_to_the_group_ends_vllm_and_the_guard_reports_it() -> None:
    with guarded(SLEEPER) as (guard, writer):
        wait_for(lambda: len(group_members(guard.pid)) == 2, 10, "the guard and its child")
        os.killpg(guard.pid, signal.SIGTERM)  # the worker's own stop
        assert guard.wait(10) == -signal.SIGTERM, "vLLM's death, not the guard's own"


def test_when_the_worker_is_gone_the_whole_group_ends_stubborn_processes_included() -> None:
    with guarded(STUBBORN, grace=1) as (guard, writer):
        wait_for(lambda: len(group_members(guard.pid)) == 3, 10, "vLLM and its engine core")
        os.close(writer)  # what the worker's death does to the pipe, whatever the signal
        began = time.monotonic()
        wait_for(lambda: group_members(guard.pid) == [], 10, "the group to end")
        assert time.monotonic() - began < 1 + 2, "SIGTERM, the grace, then SIGKILL"
