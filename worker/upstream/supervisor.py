"""The one owner of every vLLM child's life: start, health, watch, stop.

vLLM runs in a process group of its own (its engine core and workers are
grandchildren that can outlive a killed API server and keep GPU memory), so
every stop signals the whole group: SIGTERM, a bounded wait (`STOP_GRACE`, or
`DEATH_STOP_GRACE` for what is left of a vLLM that died), then SIGKILL. Its
output goes to the worker's log line by line with a `[vllm]` prefix, and the
last lines are kept to quote when it fails. `wait_healthy` polls `/health`
until 200 while watching for an early exit; `start_upstreams` starts every
model's vLLM at once and returns only when all are healthy (or none is left
running); `watch` reports a death while serving; `stop_all` stops them together.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from worker.launch.plan import Launch
from worker.masking import show
from worker.upstream.target import Target
from worker.upstream.timeline import Timeline

log = logging.getLogger("worker.supervisor")
STOP_GRACE = 10.0  # seconds a stopping vLLM gets between SIGTERM and SIGKILL
# What is left of a vLLM that died (its engine core, workers) has no answer to finish and
# holds GPU memory: it gets this long after SIGTERM, not a healthy server's STOP_GRACE, so the
# worker is gone within 5 s of the death even when an orphan ignores SIGTERM.
DEATH_STOP_GRACE = 1.0
QUOTED_LINES = 25  # of vLLM's last lines, quoted when it fails
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


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class VllmChild:
    """A vLLM server process (any command, in tests a stand-in) and its process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 tail_size: int = 60, on_line: Callable[[str], None] | None = None) -> None:
        self.argv = list(argv)
        self.on_line = on_line  # sees each output line (the start-up timeline)
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
                if self.on_line is not None:
                    self.on_line(line)
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
        raise StartupError(f"vLLM {reason} during start-up.{child.quoted_tail()}")
    where = "" if child is not None else f" at {base_url} (VLLM_BASE_URL)"
    tail = child.quoted_tail() if child is not None else ""
    raise StartupError(f"vLLM{where} was not healthy after {timeout:g} s "
                       f"(VLLM_STARTUP_TIMEOUT).{tail}")


@dataclass
class Upstream:
    """One vLLM server jobs go to, and the child process behind it (None in external mode)."""

    target: Target
    child: VllmChild | None = None
    timeline: Timeline | None = None

    def exit_reason(self, timeout: float = 0) -> str | None:
        return self.child.exit_reason(timeout) if self.child else None

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.child is not None:
            self.child.stop(grace)


def connect(name: str, base_url: str, timeout: float) -> Upstream:
    """A vLLM server that runs already (VLLM_BASE_URL), once healthy."""
    log.info("VLLM_BASE_URL is set: using the vLLM server at %s", base_url)
    took = wait_healthy(base_url, timeout)
    log.info("vLLM at %s is healthy (%.1f s)", base_url, took)
    return Upstream(discover_routes(Target(name, base_url)))


class Fleet:
    """The vLLM servers of one worker, as they are started. `stop` may come from another
    thread at any time (SIGTERM while vLLM loads): no child is started after it."""

    def __init__(self) -> None:
        self.upstreams: list[Upstream] = []
        self._lock = threading.Lock()
        self._stopped = False

    def add(self, upstream: Upstream) -> None:
        """Take `upstream` and start its child, unless the fleet was stopped already."""
        with self._lock:
            if self._stopped:
                raise StartupError("The worker was told to stop while vLLM was starting.")
            self.upstreams.append(upstream)
            if upstream.child is not None:
                upstream.child.start()

    def stop(self, grace: float = STOP_GRACE) -> None:
        with self._lock:
            self._stopped = True
        stop_all(self.upstreams, grace)


def start_upstreams(launches: Sequence[Launch], timeout: float, fleet: Fleet,
                    secrets: Sequence[str] = ()) -> list[Upstream]:
    """Every planned vLLM started at once into `fleet`, and healthy; StartupError otherwise,
    with every child stopped (also when interrupted, e.g. by SIGTERM while loading)."""
    try:
        for launch in launches:
            for reason in launch.reasons:
                log.info("%s", reason)
            log.info("Starting vLLM for %s: %s", launch.model.served_name,
                     show(launch.argv, secrets))
            timeline = Timeline(launch.model.served_name, launch.weights_bytes,
                                launch.located_in)
            adapters = frozenset(adapter.name for adapter in launch.adapters)
            fleet.add(Upstream(Target(launch.model.served_name, launch.base_url,
                                      adapters=adapters),
                               VllmChild(launch.argv, launch.env, on_line=timeline.feed),
                               timeline))
        for upstream in fleet.upstreams:  # they load in parallel: waiting in turn costs nothing
            took = wait_healthy(upstream.target.base_url, timeout, upstream.child)
            assert upstream.timeline is not None  # every upstream started here has one
            upstream.timeline.mark_healthy()
            logged = upstream.timeline.routes()
            upstream.target = (replace(upstream.target, routes=logged) if logged is not None
                               else discover_routes(upstream.target))
            log.info("vLLM for %s is healthy after %.1f s", upstream.target.name, took)
    except BaseException:
        fleet.stop(grace=5)
        raise
    return fleet.upstreams


def discover_routes(target: Target) -> Target:
    """The routes this vLLM serves (it mounts only those its model supports), asked of
    it: for a vLLM whose start-up log did not list them (timeline.py)."""
    try:
        paths = httpx.get(f"{target.base_url}/openapi.json", timeout=10).json()["paths"]
        return replace(target, routes=frozenset(paths))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        log.warning("Could not read %s/openapi.json: every route is tried", target.base_url)
        return target


def exit_reason(upstreams: Sequence[Upstream], timeout: float = 0) -> str | None:
    """How the vLLMs that ended did (`for <name> <how>; ...`), None while all run."""
    reasons = [(u.target.name, u.exit_reason(timeout)) for u in upstreams]
    return "; ".join(f"for {name} {reason}" for name, reason in reasons if reason) or None


def watch(upstreams: Sequence[Upstream], on_death: Callable[[Upstream, str], None]) -> None:
    """Call `on_death(upstream, how)` from a thread of its own when a child ends unasked."""
    def wait(upstream: Upstream, child: VllmChild) -> None:
        reason = child.wait()
        if not child.stopping:
            on_death(upstream, reason)

    for upstream in upstreams:
        if upstream.child is not None:
            threading.Thread(target=wait, args=(upstream, upstream.child), name="vllm-watch",
                             daemon=True).start()


def stop_all(upstreams: Sequence[Upstream], grace: float = STOP_GRACE) -> None:
    """Stop every child at once (each gets the same grace period, not one after another)."""
    stoppers = [threading.Thread(target=u.stop, args=(grace,)) for u in upstreams]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
