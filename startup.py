"""Bring vLLM up before any job is taken, and keep the worker honest about it.

Shared by the Runpod worker (`handler.py`) and the local endpoint:
1. `setup_logging` masks every secret in every log line, vLLM's included.
2. `start_upstream` locates the weights, spawns vLLM on loopback (or uses
   `VLLM_BASE_URL`) and waits for `/health`; any failure is a `StartupError`
   whose message says why, with vLLM's last lines.
3. `Supervision` watches the child while serving: if vLLM dies, new jobs are
   refused with 503, jobs in flight get their errors out, the group is killed
   and the process exits 1 within a few seconds, so the platform replaces the
   worker. On SIGTERM/SIGINT, jobs in flight get `SHUTDOWN_GRACE_PERIOD`,
   then the child's group is stopped and the process exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from model_locator import Location, LocatorError, link_for_vllm, locate
from parsers import Choice, choose, read_model_info
from proxy import Proxy
from relay import Pacing
from settings import Settings, SettingsError, load, secret_values
from supervisor import StartupError, VllmChild, wait_healthy
from vllm_command import build_command, count_gpus, mask, show

log = logging.getLogger("worker")
DEATH_DRAIN_SECONDS = 3.0


class _MaskSecrets(logging.Filter):
    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = mask(text, self.secrets)
        if masked != text:
            record.msg, record.args = masked, None
        return True


def setup_logging(secrets: Sequence[str] = (), level: int = logging.INFO) -> None:
    """One stderr handler for the worker's and vLLM's lines, with secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_MaskSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class Upstream:
    """The vLLM server jobs go to, and the child process behind it (None in external mode)."""

    base_url: str
    served_model: str
    child: VllmChild | None = None

    def exit_reason(self, timeout: float = 0) -> str | None:
        return self.child.exit_reason(timeout) if self.child else None

    def stop(self, grace: float = 10) -> None:
        if self.child is not None:
            self.child.stop(grace)


@dataclass(frozen=True)
class Launch:
    """How vLLM will be started: where the weights are, what it is given, which parsers."""

    location: Location
    model: str
    parsers: Choice
    argv: list[str]


def plan_launch(settings: Settings, env: Mapping[str, str]) -> Launch:
    """Locate the weights, pick the parsers and build the command (LocatorError,
    SettingsError when that cannot work)."""
    location = locate(settings.model_name, settings.model_path, settings.hf_home,
                      settings.hub_caches)
    model = link_for_vllm(location.model, settings.hf_home) if location.is_local \
        else location.model
    info = read_model_info(settings.model_label, location.model if location.is_local else None)
    choice = choose(info, settings.enable_auto_tool_choice, settings.tool_call_parser,
                    settings.reasoning_parser)
    return Launch(location, model, choice, build_command(settings, model, count_gpus(env), choice))


def start_upstream(settings: Settings, env: Mapping[str, str]) -> Upstream:
    """Locate, spawn and wait until healthy; StartupError (or LocatorError) otherwise."""
    if settings.vllm_base_url:
        log.info("VLLM_BASE_URL is set: using the vLLM server at %s", settings.upstream_url)
        took = wait_healthy(settings.upstream_url, settings.startup_timeout)
        log.info("vLLM at %s is healthy (%.1f s)", settings.upstream_url, took)
        return Upstream(settings.upstream_url, settings.served_model_name)
    launch = plan_launch(settings, env)
    for step in launch.location.steps + launch.parsers.reasons:
        log.info("%s", step)
    argv = launch.argv
    log.info("Starting vLLM as %s: %s", settings.served_model_name, show(argv, settings.secrets))
    child = VllmChild(argv, env)
    child.start()
    try:
        took = wait_healthy(settings.upstream_url, settings.startup_timeout, child)
    except BaseException:
        child.stop(grace=5)
        raise
    log.info("vLLM is healthy after %.1f s; taking jobs", took)
    return Upstream(settings.upstream_url, settings.served_model_name, child)


def run_startup(env: Mapping[str, str] = os.environ) -> tuple[Settings, Upstream]:
    """Settings, logging and a healthy vLLM; on failure, log why and exit (2: settings, 1: else)."""
    try:
        settings = load(env)
    except SettingsError as exc:
        setup_logging(secret_values(env))
        log.error("Invalid setting: %s", exc)
        sys.exit(2)
    setup_logging(settings.secrets)
    try:
        return settings, start_upstream(settings, env)
    except (LocatorError, StartupError, SettingsError) as exc:
        log.error("Start-up failed: %s", exc)
        sys.exit(1)


def make_proxy(settings: Settings, upstream: Upstream) -> Proxy:
    pacing = Pacing(settings.stream_flush_interval, settings.min_batch_size,
                    settings.max_batch_size, settings.batch_size_growth_factor or 3.0)
    return Proxy(upstream.base_url, upstream.served_model, settings.request_timeout, pacing,
                 settings.default_max_tokens, upstream.exit_reason)


class Supervision:
    """Reacts to the child's death and to stop signals; see the module docstring."""

    def __init__(self, upstream: Upstream, proxy: Proxy, jobs_in_progress: Callable[[], int],
                 grace: float, exit_process: Callable[[int], None] = os._exit) -> None:
        self.upstream = upstream
        self.proxy = proxy
        self.jobs_in_progress = jobs_in_progress
        self.grace = grace
        self.exit_process = exit_process
        self._ending = threading.Lock()

    def watch(self) -> None:
        """Start the thread that notices vLLM's death."""
        if self.upstream.child is not None:
            threading.Thread(target=self._watch, name="vllm-watch", daemon=True).start()

    def _watch(self) -> None:
        assert self.upstream.child is not None
        reason = self.upstream.child.wait()
        if self.upstream.child.stopping:
            return
        tail = "\n".join(f"  {line}" for line in self.upstream.child.tail()[-25:])
        log.error("vLLM %s while serving; refusing new jobs and exiting. Its last lines:\n%s",
                  reason, tail)
        self.proxy.refusal = f"vLLM {reason}; the worker is restarting"
        self._end(DEATH_DRAIN_SECONDS, 1)

    def on_signal(self, signum: int) -> None:
        """Begin a graceful stop (call from a signal handler: it returns at once)."""
        log.info("%s received: finishing jobs in flight (up to %g s), then stopping vLLM",
                 signal.Signals(signum).name, self.grace)
        threading.Thread(target=self._end, args=(self.grace, 0), daemon=True).start()

    def _end(self, drain_seconds: float, code: int) -> None:
        if not self._ending.acquire(blocking=False):
            return
        deadline = time.monotonic() + drain_seconds
        while self.jobs_in_progress() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.jobs_in_progress() > 0:
            log.warning("%d job(s) still running after %g s: stopping anyway",
                        self.jobs_in_progress(), drain_seconds)
        self.upstream.stop()
        # os._exit skips the atexit hook that ends the SDK's heartbeat process: end it here,
        # or it outlives the worker and keeps telling the platform the worker is alive.
        for helper in multiprocessing.active_children():
            helper.terminate()
            helper.join(timeout=2)
        logging.shutdown()
        self.exit_process(code)

    def chain_signals(self) -> None:
        """Run `on_signal` after whatever handler is installed now (the Runpod SDK's)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def chained(sig: int, frame: object, previous: object = previous) -> None:
                self.on_signal(sig)
                if callable(previous):
                    previous(sig, frame)

            signal.signal(signum, chained)
