"""VllmChild against the stand-in vLLM running as a real process: its group, its output, its
stop. Process checks read /proc (`group_members`), because a dead leader says nothing
about its engine-core grandchildren."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.children import Started, wait_for
from worker.masking import secret_values, setup_logging
from worker.upstream.child import group_members
from worker.upstream.supervisor import wait_healthy

PROJECT = Path(__file__).resolve().parents[2]


def test_healthy_child_stops_cleanly_leaving_no_process_of_its_group(
        spawn: Callable[..., Started]) -> None:
    """The health wait must see through refused connections, and a stop must empty the group."""
    started = spawn(FAKE_VLLM_HEALTHY_AFTER="0.3", FAKE_VLLM_GRANDCHILD="obey")
    took = wait_healthy(started.url, timeout=15, child=started.child)
    assert took >= 0.3
    pgid = started.child.pid
    wait_for(lambda: len(group_members(pgid)) == 3, 5, "the guard, the server and its engine core")

    began = time.monotonic()
    started.child.stop(grace=5)

    assert time.monotonic() - began < 3, "a child that obeys SIGTERM needs no SIGKILL"
    assert group_members(pgid) == []
    assert started.child.exit_reason() == "exited with code 0"
    started.child.stop(grace=5)  # idempotent
    assert group_members(pgid) == []


@pytest.mark.parametrize(("server", "engine_core", "reason"), [
    ("1", "obey", "killed by SIGKILL"),
    ("0", "ignore-sigterm", "exited with code 0"),
    ("1", "ignore-sigterm", "killed by SIGKILL"),
], ids=["server-ignores", "engine-core-ignores", "both-ignore"])
def test_processes_ignoring_sigterm_are_killed_after_the_grace_period(
        spawn: Callable[..., Started], caplog: pytest.LogCaptureFixture,
        server: str, engine_core: str, reason: str) -> None:
    """A stuck API server or an orphaned engine core would keep the GPU memory: SIGKILL them."""
    started = spawn(FAKE_VLLM_IGNORE_SIGTERM=server, FAKE_VLLM_GRANDCHILD=engine_core)
    wait_healthy(started.url, timeout=15, child=started.child)
    pgid = started.child.pid
    wait_for(lambda: len(group_members(pgid)) == 3, 5, "the guard, the server and its engine core")
    caplog.set_level(logging.WARNING, logger="worker.supervisor")

    began = time.monotonic()
    started.child.stop(grace=1)
    took = time.monotonic() - began

    assert 1 <= took < 4
    assert group_members(pgid) == []
    assert started.child.exit_reason() == reason
    assert any("SIGKILL" in r.getMessage() for r in caplog.records)


def test_output_lines_reach_the_vllm_logger_with_a_prefix(
        spawn: Callable[..., Started], caplog: pytest.LogCaptureFixture) -> None:
    """vLLM's own lines are the first thing to read when it misbehaves: they must be logged."""
    caplog.set_level(logging.INFO, logger="vllm")
    started = spawn()
    wait_healthy(started.url, timeout=15, child=started.child)

    def running_line() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "Uvicorn running on" in r.getMessage()]

    wait_for(running_line, 5, "the server's 'running' line in the log")
    record = running_line()[0]
    assert record.name == "vllm"
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("[vllm] INFO:     Uvicorn running on http://127.0.0.1:")
    assert all(r.getMessage().startswith("[vllm] ") for r in caplog.records if r.name == "vllm")


@pytest.mark.usefixtures("restore_logging")
def test_secrets_printed_by_vllm_are_masked_in_the_log(
        spawn: Callable[..., Started], monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that dumps its environment must not put HF_TOKEN into the worker's log."""
    token = "hf_" + os.urandom(12).hex()
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(secret_values({"HF_TOKEN": token}))

    started = spawn(HF_TOKEN=token, FAKE_VLLM_PRINT_ENV="HF_TOKEN")
    wait_healthy(started.url, timeout=15, child=started.child)
    wait_for(lambda: "environment HF_TOKEN=" in stream.getvalue(), 5, "the printed variable")
    started.child.stop(grace=5)

    logged = stream.getvalue()
    assert token not in logged
    assert "[vllm] INFO fake vllm: environment HF_TOKEN=***" in logged
    assert any(token in line for line in started.child.tail()), "the child did print it"


def test_vllm_leads_its_own_process_group_inside_the_workers_session(
        spawn: Callable[..., Started]) -> None:
    """Its own group, so one signal reaches all of vLLM; the worker's session, because Linux
    schedules a session as one unit and vLLM alone in one stalled for seconds on 2 cores."""
    started = spawn(FAKE_VLLM_HEALTHY_AFTER="0")
    pid = started.child.pid
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) == os.getsid(0)


REAPER = """
import ctypes, json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from worker.upstream.child import VllmChild, group_members
from worker.upstream.supervisor import wait_healthy
# As PID 1 in the image: orphans of vLLM's group are re-parented to this process.
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
child = VllmChild(["sh", "-c", "sleep 60 & exec sleep 60"])
child.start()
while len(group_members(child.pid)) < 2:
    time.sleep(0.01)
os.kill(child.pid, signal.SIGKILL)  # the leader dies: its own child is orphaned to us
child.stop(grace=5)
print(json.dumps(group_members(child.pid, zombies=True)))
"""


def test_an_orphaned_vllm_process_is_reaped_by_the_worker_that_inherits_it() -> None:
    """In the image the worker is PID 1 with no init: an engine core left by a crash
    becomes its child, and a zombie for ever unless the worker reaps it."""
    done = subprocess.run([sys.executable, "-c", REAPER, str(PROJECT)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
