"""The one owner of the vLLM child process's life.

vLLM runs in a process group of its own (its engine core and workers are
grandchildren that can outlive a killed API server and keep GPU memory), so
every stop signals the whole group: SIGTERM, a bounded wait, then SIGKILL.
Its output goes to the worker's log line by line with a `[vllm]` prefix, and
the last lines are kept to quote when it fails. `wait_healthy` polls `/health`
until 200 while watching for an early exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

log = logging.getLogger("worker.supervisor")
STOP_GRACE = 10.0  # seconds a stopping vLLM gets between SIGTERM and SIGKILL
vllm_log = logging.getLogger("vllm")


class StartupError(RuntimeError):
    """vLLM did not become healthy; the message says why and quotes its last lines."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def group_members(pgid: int) -> list[int]:
    """PIDs of live processes in a process group, read from /proc (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


class VllmChild:
    """A vLLM server process (any command, in tests a stand-in) and its process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 tail_size: int = 60) -> None:
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self._tail: deque[str] = deque(maxlen=tail_size)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "start() first"
        return self._proc.pid

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        # A process group of its own, to signal all of vLLM at once; not a session of its
        # own: Linux schedules each session as one group (autogroup), and vLLM alone in one
        # ran in bursts on a 2-core machine, its API server silent for seconds mid-stream.
        self._proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, process_group=0)
        self._pump = threading.Thread(target=self._copy_output, name="vllm-log", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self._proc.stdout:  # closed at EOF, once every process of the group has gone
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip()
                self._tail.append(line)
                vllm_log.info("[vllm] %s", line)

    def tail(self) -> list[str]:
        return list(self._tail)

    def exit_reason(self, timeout: float = 0) -> str | None:
        """How the child ended, waiting up to `timeout` s for it; None while it runs."""
        if self._proc is None:
            return None
        try:
            code = self._proc.wait(timeout) if timeout > 0 else self._proc.poll()
        except subprocess.TimeoutExpired:
            return None
        return None if code is None else describe_exit(code)

    def wait(self) -> str:
        """Block until the child exits; how it ended."""
        assert self._proc is not None
        return describe_exit(self._proc.wait())

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop the whole group: SIGTERM, up to `grace` s, then SIGKILL; reap. Idempotent."""
        if self._proc is None:
            return
        self._stopping.set()
        pgid = self._proc.pid
        self._signal_group(pgid, signal.SIGTERM)
        if not self._wait_group(pgid, grace):
            log.warning("vLLM did not stop within %.0f s of SIGTERM: sending SIGKILL", grace)
            self._signal_group(pgid, signal.SIGKILL)
            if not self._wait_group(pgid, 10):
                log.error("vLLM processes %s are still there 10 s after SIGKILL",
                          group_members(pgid))
        if self._pump is not None:
            self._pump.join(timeout=2)

    def _wait_group(self, pgid: int, seconds: float) -> bool:
        """Reap the leader and wait until no process of the group is left; False on timeout."""
        assert self._proc is not None
        deadline = time.monotonic() + seconds
        while True:
            if self._proc.poll() is not None and not group_members(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)


def wait_healthy(base_url: str, timeout: float, child: VllmChild | None = None,
                 interval: float = 0.1) -> float:
    """Poll `{base_url}/health` until 200; seconds it took. Raise StartupError otherwise."""
    started = time.monotonic()
    last_report = [started]

    def child_exited(state: RetryCallState) -> bool:
        return child is not None and child.exit_reason() is not None

    def report(state: RetryCallState) -> None:
        now = time.monotonic()
        if now - last_report[0] >= 15:
            last_report[0] = now
            log.info("Waiting for vLLM to become healthy: %.0f s of %.0f s (VLLM_STARTUP_TIMEOUT)",
                     now - started, timeout)

    with httpx.Client(timeout=5) as client:
        retrying = Retrying(
            stop=stop_after_delay(timeout) | child_exited,
            wait=wait_fixed(interval),
            retry=retry_if_result(lambda healthy: not healthy)
            | retry_if_exception_type(httpx.HTTPError),
            before_sleep=report,
            retry_error_callback=lambda state: False,
        )
        healthy = retrying(lambda: client.get(f"{base_url}/health").status_code == 200)
    if healthy:
        return time.monotonic() - started
    if child is not None and (reason := child.exit_reason()) is not None:
        raise StartupError(f"vLLM {reason} during start-up.{_quote(child)}")
    where = "" if child is not None else f" at {base_url} (VLLM_BASE_URL)"
    tail = _quote(child) if child is not None else ""
    raise StartupError(f"vLLM{where} was not healthy after {timeout:g} s "
                       f"(VLLM_STARTUP_TIMEOUT).{tail}")


def _quote(child: VllmChild) -> str:
    lines = child.tail()[-25:]
    if not lines:
        return " It printed nothing."
    return " Its last lines:\n" + "\n".join(f"  {line}" for line in lines)
