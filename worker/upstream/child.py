"""One vLLM process and its process group: spawned, its output copied, stopped whole.

vLLM runs in a process group of its own (its engine core and workers are grandchildren
that can outlive a killed API server and keep GPU memory), so a stop signals the whole
group: SIGTERM, a bounded wait, then SIGKILL, and reaps. It is started under guard.py,
which ends the group when the worker dies by any means (the worker holds the only writing
end of a pipe the guard reads; a process forked from the worker closes it at once). Its
output goes to the worker's log line by line with a `[vllm]` prefix, and the last lines
are kept to quote (and to judge) when it fails. What is read from /proc (the members of a
group, their parents) is here too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("worker.supervisor")
GUARD = str(Path(__file__).with_name("guard.py"))
ORPHAN_GRACE = 3.0  # s a vLLM whose worker died gets after SIGTERM: no answer to finish
STOP_GRACE = 10.0  # seconds a stopping vLLM gets between SIGTERM and SIGKILL
QUOTED_LINES = 25  # of vLLM's last lines, quoted when it fails
vllm_log = logging.getLogger("vllm")
# What vLLM's uvicorn prints once it listens: the health poll is woken by it at once.
LISTENING = ("Application startup complete", "Uvicorn running on")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def group_members(pgid: int, zombies: bool = False) -> list[int]:
    """PIDs of the live processes in a process group, read from /proc (with `zombies`,
    those of its processes that ended and were not reaped, instead)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and (fields[0] == b"Z") == zombies:
            members.append(int(entry))
    return members


def reap_orphans(pgid: int, leader: int) -> None:
    """Reap the ended processes of a vLLM group that became ours: in the image the worker
    is PID 1, so an engine core orphaned by a crash is re-parented to it, and no one else
    would ever reap it. The leader is left to its Popen, which reaps it."""
    me = os.getpid()
    for pid in group_members(pgid, zombies=True):
        if pid != leader:
            with contextlib.suppress(ChildProcessError):  # not ours: its parent reaps it
                if _parent(pid) == me:
                    os.waitpid(pid, os.WNOHANG)


_LIFELINES: set[int] = set()  # the writing ends of the guards' pipes


def _drop_lifelines() -> None:
    """In a process forked from the worker (the SDK's heartbeat): were it to keep a guard's
    pipe open, that vLLM would outlive the worker."""
    for fd in _LIFELINES:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LIFELINES.clear()


os.register_at_fork(after_in_child=_drop_lifelines)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class VllmChild:
    """A vLLM server process (any command, in tests a stand-in) and its process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 tail_size: int = 400, on_line: Callable[[str], None] | None = None) -> None:
        self.argv = list(argv)
        self.on_line = on_line  # sees each output line (the start-up timeline)
        self.env = dict(env) if env is not None else None
        self._tail: deque[str] = deque(maxlen=tail_size)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self.listening = threading.Event()  # its log said it listens (LISTENING)
        self._pump: threading.Thread | None = None
        self._lifeline: int | None = None

    @property
    def pid(self) -> int:
        """The guard's pid, which leads vLLM's process group (and reports vLLM's exit)."""
        assert self._proc is not None, "start() first"
        return self._proc.pid

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self) -> None:
        # A process group of its own, to signal all of vLLM at once; not a session of its
        # own: Linux schedules each session as one group (autogroup), and vLLM alone in one
        # ran in bursts on a 2-core machine, its API server silent for seconds mid-stream.
        reader, self._lifeline = os.pipe()
        _LIFELINES.add(self._lifeline)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, GUARD, str(reader), f"{ORPHAN_GRACE:g}", *self.argv],
                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, process_group=0, pass_fds=(reader,))
        finally:
            os.close(reader)
        self._pump = threading.Thread(target=self._copy_output, name="vllm-log", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self._proc.stdout:  # closed at EOF, once every process of the group has gone
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip()
                self._tail.append(line)
                if self.on_line is not None:
                    self.on_line(line)
                if not self.listening.is_set() and any(sign in line for sign in LISTENING):
                    self.listening.set()
                vllm_log.info("[vllm] %s", line)

    def tail(self, count: int | None = None) -> list[str]:
        """vLLM's last lines (the last `count` of them)."""
        lines = list(self._tail)
        return lines if count is None else lines[-count:]

    def quoted_tail(self) -> str:
        """vLLM's last lines, indented, to quote in a log line or an error."""
        lines = self.tail(QUOTED_LINES)
        if not lines:
            return " It printed nothing."
        return " Its last lines:\n" + "\n".join(f"  {line}" for line in lines)

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
        if self._lifeline is not None:  # the guard has gone with its group
            _LIFELINES.discard(self._lifeline)
            with contextlib.suppress(OSError):
                os.close(self._lifeline)
            self._lifeline = None

    def _wait_group(self, pgid: int, seconds: float) -> bool:
        """Reap the leader and wait until no process of the group is left; False on timeout."""
        assert self._proc is not None
        deadline = time.monotonic() + seconds
        while True:
            if self._proc.poll() is not None and not group_members(pgid):
                reap_orphans(pgid, pgid)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
