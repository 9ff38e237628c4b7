"""The one owner of every vLLM child's life: start, health, watch, stop.

Each child is a `VllmChild` (child.py: its process group, output and stop). Here:
`wait_healthy` polls `/health` until 200 while watching for an early exit;
`start_upstreams` starts every model's vLLM at once and returns only when all are
healthy (or none is left running); `watch` reports a death while serving; `stop_all`
stops them together (`STOP_GRACE` each, or `DEATH_STOP_GRACE` for what is left of a
vLLM that died).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from worker.launch.command import count_gpus
from worker.launch.plan import Launch
from worker.masking import show
from worker.upstream.child import STOP_GRACE, VllmChild
from worker.upstream.ports import taken
from worker.upstream.target import Target
from worker.upstream.timeline import Timeline
from worker.upstream.verdicts import Facts, Verdict, judge

log = logging.getLogger("worker.supervisor")
# What is left of a vLLM that died (its engine core, workers) has no answer to finish and
# holds GPU memory: it gets this long after SIGTERM, not a healthy server's STOP_GRACE, so the
# worker is gone within 5 s of the death even when an orphan ignores SIGTERM.
DEATH_STOP_GRACE = 1.0


class StartupError(RuntimeError):
    """vLLM did not become healthy; the message says why and quotes its last lines, and
    `verdict`, when the failure is a known one, says it in one sentence (verdicts.py)."""

    def __init__(self, message: str, verdict: Verdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


def facts_of(launch: Launch) -> Facts:
    """What a verdict on this launch may name: the settings it was made of."""
    argv = launch.argv

    def flag(name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv[:-1] else None

    parallel = flag("--tensor-parallel-size")
    return Facts(model=launch.model.path or launch.model.name,
                 max_model_len=launch.model.max_model_len,
                 gpu_memory_utilization=launch.model.gpu_memory_utilization,
                 tensor_parallel_size=int(parallel) if parallel else None,
                 gpus=count_gpus(launch.env), port=launch.model.port,
                 token_given=bool(launch.env.get("HF_TOKEN")), revision=flag("--revision"),
                 weights_bytes=launch.weights_bytes)


def wait_healthy(base_url: str, timeout: float, child: VllmChild | None = None,
                 interval: float = 0.1) -> float:
    """Poll `{base_url}/health` until 200; seconds it took. Raise StartupError otherwise."""
    # Imported here, once vLLM is spawned: nothing of them is needed before.
    import httpx
    from tenacity import (
        RetryCallState,
        Retrying,
        retry_if_exception_type,
        retry_if_result,
        stop_after_delay,
        wait_fixed,
    )

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

    def sleep(seconds: float) -> None:  # or less: until the child's log says it listens
        if child is None:
            time.sleep(seconds)
        elif child.listening.wait(seconds):
            child.listening.clear()

    with httpx.Client(timeout=5) as client:
        retrying = Retrying(
            stop=stop_after_delay(timeout) | child_exited,
            wait=wait_fixed(interval), sleep=sleep,
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
                    secrets: Sequence[str] = (),
                    while_loading: Callable[[], None] = lambda: None) -> list[Upstream]:
    """Every planned vLLM started at once into `fleet`, and healthy; StartupError otherwise,
    with every child stopped (also when interrupted, e.g. by SIGTERM while loading).
    `while_loading` runs once all are spawned, before waiting for them."""
    facts: dict[str, Facts] = {}
    try:
        for launch in launches:
            for reason in launch.reasons:
                log.info("%s", reason)
            if (why := taken(launch.model.port)) is not None:
                raise StartupError(why, Verdict("port-in-use", why, permanent=False))
            log.info("Starting vLLM for %s: %s", launch.model.served_name,
                     show(launch.argv, secrets))
            timeline = Timeline(launch.model.served_name, launch.weights_bytes,
                                launch.located_in, launch.downloaded)
            adapters = frozenset(adapter.name for adapter in launch.adapters)
            fleet.add(Upstream(Target(launch.model.served_name, launch.base_url,
                                      adapters=adapters),
                               VllmChild(launch.argv, launch.env, on_line=timeline.feed),
                               timeline))
            facts[launch.model.served_name] = facts_of(launch)
        while_loading()
        for upstream in fleet.upstreams:  # they load in parallel: waiting in turn costs nothing
            try:
                took = wait_healthy(upstream.target.base_url, timeout, upstream.child)
            except StartupError as exc:
                assert upstream.child is not None
                verdict = judge(upstream.child.tail(), facts[upstream.target.name])
                raise StartupError(str(exc), verdict) from None
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
    import httpx

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
