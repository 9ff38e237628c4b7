"""The serve context every entry point shares: start-up, supervision, one drain, stop.

    with serving(os.environ) as service:      # healthy vLLMs, or the process exits
        ...serve jobs or requests through service.proxy...

1. Start-up: logging with secrets masked, the settings (exit code 2 when one is
   invalid), one launch plan per model and every vLLM started and healthy. Nothing is
   served before. When that fails, the log ends with the reason in one sentence (the
   verdict, upstream/verdicts.py). A failure a restart cannot fix (a setting, the model,
   a gated repository, too little memory for the context) is told to the work that comes
   (`tell_failure`: every job fails with the sentence, every request is a 503 with it)
   for `FAILED_START_SECONDS`, then the process exits 1; any other exits 1 at once, so
   the platform's restart can succeed.
2. Supervision: if a vLLM dies while serving, new jobs are refused with a 503,
   jobs in flight get `DEATH_DRAIN_SECONDS` to get their errors out, every vLLM's
   group is stopped and the process exits 1, so the platform replaces the worker.
3. One drain: on SIGTERM/SIGINT, work in flight gets `SHUTDOWN_GRACE_PERIOD` in
   total; at its end new work is refused, streams still open end with an in-band
   error event, every vLLM is stopped, and the process exits 0.

An entry point is the serve context plus the thing that brings it work (the
Runpod SDK's job loop, the local endpoint, the load-balancing server); the
`Service` also starts in two steps (`Service(...)`, then `start()`) for servers
that must answer health checks while vLLM loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING

from model_locator import LocatorError
from worker.launch import weights
from worker.launch.adapters import model_sizes
from worker.launch.plan import Launch, plan_launches
from worker.masking import mask, secret_values, setup_logging
from worker.settings.loader import Settings, SettingsError, load
from worker.upstream.child import STOP_GRACE
from worker.upstream.supervisor import (
    DEATH_STOP_GRACE,
    Fleet,
    StartupError,
    Upstream,
    connect,
    exit_reason,
    start_upstreams,
    watch,
)
from worker.upstream.verdicts import Verdict

if TYPE_CHECKING:  # the pool (httpx, aiohttp) is imported while vLLM loads, not before
    from worker.requests.proxy import Proxy

log = logging.getLogger("worker")
DEATH_DRAIN_SECONDS = 3.0  # a dead vLLM's jobs only have their errors left to send
FLUSH_SECONDS = 2.0  # after the grace period, for the error events to go out


class State(Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"  # start-up failed for good: the failure is told until the exit
    STOPPING = "stopping"


def verdict_of(exc: Exception) -> Verdict:
    """What a start-up failure comes to: vLLM's own verdict when it is a known one; the
    worker's own sentence for a setting or the model's files (a restart cannot fix
    those); else vLLM's exit, as transient: the platform's restart may do better."""
    if isinstance(exc, StartupError) and exc.verdict is not None:
        return exc.verdict
    if isinstance(exc, SettingsError):
        return Verdict("setting", str(exc), permanent=True)
    if isinstance(exc, LocatorError):  # a DownloadError says whether a restart could help
        return Verdict("model", str(exc), permanent=getattr(exc, "permanent", True))
    return Verdict("unknown", str(exc).split("\n")[0], permanent=False)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Logging (secrets masked) and the settings; an invalid one ends the process (2)."""
    setup_logging(secret_values(env))
    try:
        settings = load(env)
    except SettingsError as exc:
        log.error("Invalid setting: %s", exc)
        sys.exit(2)
    for note in settings.notes:
        log.info("%s", note)
    for warning in settings.warnings:
        log.warning("%s", warning)
    return settings


def make_proxy(settings: Settings, upstreams: Sequence[Upstream]) -> Proxy:
    """The proxy to these vLLMs, configured from the settings: its pool holds a connection
    for every request the worker can have in flight to each of them."""
    from worker.requests.proxy import Proxy
    from worker.requests.relay import Pacing

    pacing = Pacing(settings.stream_flush_interval, settings.min_batch_size,
                    settings.max_batch_size, settings.batch_size_growth_factor or 3.0)
    return Proxy([u.target for u in upstreams], settings.request_timeout, pacing,
                 settings.default_max_tokens, lambda timeout: exit_reason(upstreams, timeout),
                 settings.vllm_api_key, (settings.max_concurrency + 1) * len(upstreams))


def exit_now(code: int) -> None:
    """End the process from any thread, now: the main thread may be deep in a library's
    loop (the Runpod SDK's, uvicorn's) that would otherwise wait on."""
    # os._exit skips the atexit hook that ends the SDK's heartbeat process: end it here,
    # or it outlives the worker and keeps telling the platform the worker is alive.
    import multiprocessing

    for helper in multiprocessing.active_children():
        helper.terminate()
        helper.join(timeout=2)
    logging.shutdown()
    os._exit(code)


class Service:
    """Healthy vLLMs, the proxy to them, and what happens when they die or we are told
    to stop (module docstring). `in_flight` counts the work a drain waits for (by
    default the proxy's jobs); `exit_process` is `exit_now` except in tests."""

    def __init__(self, settings: Settings, env: Mapping[str, str],
                 exit_process: Callable[[int], None] = exit_now,
                 while_loading: Callable[[], None] = lambda: None,
                 tell_failure: Callable[[Verdict], None] | None = None) -> None:
        self.settings = settings
        self.env = env
        self.exit_process = exit_process
        # Called once every vLLM is spawned, before waiting for them: what the worker needs
        # only later (the pool, the Runpod SDK) is imported then, off the start-up's path.
        self.while_loading = while_loading
        self.spawned = threading.Event()
        # How the entry point tells a start-up failure to the work that comes (it may
        # block, serving it); None: the process exits at once.
        self.tell_failure = tell_failure
        self.failure: Verdict | None = None
        self.state = State.STARTING
        self.fleet = Fleet()
        self.upstreams = self.fleet.upstreams
        self.proxy: Proxy | None = None
        self.in_flight: Callable[[], int] = lambda: self.proxy.in_flight if self.proxy else 0
        self._ending = threading.Lock()
        self._ender: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def stopping(self) -> bool:
        return self.state is State.STOPPING

    def start(self) -> Proxy:
        """Every vLLM healthy and the proxy to them (LocatorError, StartupError or
        SettingsError otherwise, with nothing left running)."""
        settings = self.settings
        if settings.vllm_base_url:
            self._loading()
            self.fleet.add(connect(settings.served_model_name, settings.upstream_url,
                                   settings.startup_timeout))
        else:
            launches = self._with_weights(plan_launches(settings, self.env))
            start_upstreams(launches, settings.startup_timeout, self.fleet, settings.secrets,
                            self._loading)
        self.proxy = make_proxy(settings, self.upstreams)
        if settings.lora_dir and not settings.vllm_base_url:
            from worker.requests.adapter_loader import AdapterLoader, OnDemand

            self.proxy.loader = AdapterLoader(self.proxy, OnDemand(
                settings.lora_dir, max(launch.lora_rank for launch in launches),
                settings.models, {launch.model.served_name: model_sizes(launch.location)
                                  for launch in launches}))
        if self.state is State.STARTING:
            self.state = State.READY
        timelines = [u.timeline for u in self.upstreams if u.timeline is not None]
        healthy = max((t.spawned + (t.healthy or 0) for t in timelines), default=None)
        for timeline in timelines:
            log.info("%s", timeline.summary(None if healthy is None
                                            else time.monotonic() - healthy))
        log.info("Serving %s", ", ".join(u.target.name for u in self.upstreams))
        return self.proxy

    def _with_weights(self, launches: list[Launch]) -> list[Launch]:
        """The launches again once the weights no folder held are downloaded (weights.py);
        DownloadError (a LocatorError) when they cannot be."""
        if not (names := weights.missing(launches)):
            return launches
        fetched = weights.fetch(self.settings, self.env, names)
        return [replace(x, downloaded=fetched[x.model.name].summary())
                if x.model.name in fetched else x for x in plan_launches(self.settings, self.env)]

    def _loading(self) -> None:
        self.spawned.set()
        self.while_loading()

    def start_in_background(self, on_ready: Callable[[], None]) -> None:
        """`start_or_exit` and supervision in a thread of their own, for a server that
        answers health checks while vLLM loads; `on_ready` once it serves."""
        def run() -> None:
            if self.start_or_exit():
                self.supervise()
                on_ready()

        threading.Thread(target=run, name="vllm-start", daemon=True).start()

    def start_or_exit(self) -> bool:
        """`start`, or log why it failed and end the process (1), from any thread; False
        when the worker was told to stop while vLLM was loading (not a failure)."""
        try:
            self.start()
            return True
        except (LocatorError, StartupError, SettingsError) as exc:
            if self.stopping:
                return False
            log.error("Start-up failed: %s", exc)
            verdict = verdict_of(exc)  # it may quote vLLM, and so a secret: masked for answers
            verdict = replace(verdict, sentence=mask(verdict.sentence, self.settings.secrets))
            seconds = self.settings.failed_start_seconds
            if verdict.permanent and seconds > 0 and self.tell_failure is not None:
                self._tell(verdict, seconds)
                return False
            if verdict.cause != "unknown":  # the last line: the reason, first in a log view
                log.error("%s", verdict.sentence)
            if threading.current_thread() is threading.main_thread():
                sys.exit(1)  # unwinds through the serve context, which leaves nothing running
            self.exit_process(1)
            return False

    def _tell(self, verdict: Verdict, seconds: float) -> None:
        """Tell a failure a restart cannot fix to the work that comes, for `seconds`, then
        exit 1 with the sentence as the log's last line."""
        self.failure, self.state = verdict, State.FAILED
        log.error("%s (every job and request is answered with this for %g s "
                  "(FAILED_START_SECONDS), then the worker exits)", verdict.sentence, seconds)

        def give_up() -> None:
            log.error("Exiting: %s", verdict.sentence)
            self.exit_process(1)

        timer = threading.Timer(seconds, give_up)
        timer.daemon = True
        timer.start()
        assert self.tell_failure is not None
        self.tell_failure(verdict)

    def supervise(self) -> None:
        """Watch every child: a death while serving ends the worker (module docstring)."""
        watch(self.upstreams, self._on_death)

    def _on_death(self, upstream: Upstream, reason: str) -> None:
        tail = upstream.child.quoted_tail() if upstream.child else ""
        log.error("vLLM for %s %s while serving; refusing new jobs and exiting.%s",
                  upstream.target.name, reason, tail)
        if self.proxy is not None:
            self.proxy.refuse(f"vLLM for {upstream.target.name} {reason}; the worker is "
                              "restarting")
        self._begin_end(DEATH_DRAIN_SECONDS, 1, DEATH_STOP_GRACE)

    def on_signal(self, signum: int) -> None:
        """Begin the graceful stop (safe in a signal handler: it returns at once)."""
        log.info("%s received: finishing work in flight (up to %g s), then stopping vLLM",
                 signal.Signals(signum).name, self.settings.shutdown_grace_period)
        self._begin_end(self.settings.shutdown_grace_period, 0, STOP_GRACE)

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT begin the graceful stop, then run the handler a library
        installed before (the Runpod SDK's stops its job loop); idempotent. A process
        forked later (the SDK's heartbeat) inherits the handler: there it acts as the
        default one, so terminating the helper ends it."""
        owner = os.getpid()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if getattr(previous, "service", None) is self:
                continue  # installed already
            if previous is signal.default_int_handler or getattr(previous, "unwinds", False):
                previous = None  # Python's and start-up's own: they would unwind the server

            def chained(sig: int, frame: object, previous: object = previous) -> None:
                if os.getpid() != owner:
                    signal.signal(sig, signal.SIG_DFL)
                    os.kill(os.getpid(), sig)
                    return
                self.on_signal(sig)
                if callable(previous):
                    previous(sig, frame)

            chained.service = self  # type: ignore[attr-defined]
            signal.signal(signum, chained)

    def _begin_end(self, drain_seconds: float, code: int, stop_grace: float) -> None:
        if not self._ending.acquire(blocking=False):
            return
        self.state = State.STOPPING
        self._ender = threading.Thread(target=self._end, args=(drain_seconds, code, stop_grace),
                                       name="worker-stop", daemon=True)
        self._ender.start()

    def _end(self, drain_seconds: float, code: int, stop_grace: float) -> None:
        if not self._wait_idle(drain_seconds):
            log.warning("%d job(s) still running after %g s: stopping anyway",
                        self.in_flight(), drain_seconds)
            if self.proxy is not None:
                reason = "The worker is stopping; the answer was cut off at its grace period."
                self.proxy.refuse(reason)
                self.proxy.close_streams(reason)
        self.fleet.stop(stop_grace)
        self._wait_idle(FLUSH_SECONDS)
        self.exit_process(code)

    def _wait_idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for the work in flight to end; True once none is left."""
        deadline = time.monotonic() + seconds
        while self.in_flight() > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Leave nothing running: finish a stop in progress, else stop every vLLM now."""
        if self._ender is not None:
            self._ender.join()
        else:
            self.fleet.stop()


def unwind_on_sigterm() -> None:
    """Until serving begins, make SIGTERM raise SystemExit.

    Python's default action would end the worker at once and leave vLLM, in its own
    process group, running; unwinding lets the start-up stop it.
    """
    main_pid = os.getpid()

    def unwind(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:  # not in a helper process forked meanwhile
            log.info("SIGTERM received before serving: stopping vLLM")
        raise SystemExit(0)

    unwind.unwinds = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, unwind)


@contextlib.contextmanager
def serving(env: Mapping[str, str] = os.environ, settings: Settings | None = None,
            while_loading: Callable[[], None] = lambda: None,
            tell_failure: Callable[[Verdict], None] | None = None) -> Iterator[Service]:
    """A started, supervised Service with signals handled; every vLLM stopped at exit (the
    Service's own arguments: module docstring)."""
    unwind_on_sigterm()
    service = Service(settings or load_settings(env), env, while_loading=while_loading,
                      tell_failure=tell_failure)
    try:
        if not service.start_or_exit():
            sys.exit(1 if service.failure else 0)
        service.supervise()
        service.handle_signals()
        yield service
    finally:
        service.close()
