"""Bring vLLM up before any job is taken, and keep the worker honest about it.

Shared by the Runpod worker (`handler.py`) and the local endpoint:
1. `setup_logging` masks every secret in every log line, vLLM's included.
2. `start_upstreams` locates each model's weights, spawns one vLLM per model
   on its own loopback port (or uses `VLLM_BASE_URL`), waits for `/health`, and
   reads which routes each serves; any failure is a `StartupError` whose
   message says why, with vLLM's last lines, and no child is left running.
3. `Supervision` watches the children while serving: if any vLLM dies, new
   jobs are refused with 503, jobs in flight get their errors out, every
   child's group is killed and the process exits 1 within a few seconds, so
   the platform replaces the worker. On SIGTERM/SIGINT, jobs in flight get
   `SHUTDOWN_GRACE_PERIOD`, then the children's groups are stopped and the
   process exits 0.
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
from dataclasses import dataclass, replace

import httpx

from model_info import read_model_info
from model_locator import Location, LocatorError, link_for_vllm, locate
from parsers import Choice, choose
from proxy import Proxy
from relay import Pacing
from routes import Target
from settings import ModelSettings, Settings, SettingsError, load, secret_values
from supervisor import STOP_GRACE, StartupError, VllmChild, wait_healthy
from vllm_command import build_command, count_gpus, mask, show

log = logging.getLogger("worker")
DEATH_DRAIN_SECONDS = 3.0
# What is left of a vLLM that died (its engine core, workers) has no answer to finish and
# holds GPU memory: it gets this long after SIGTERM, not a healthy server's STOP_GRACE, so the
# worker is gone within 5 s of the death even when an orphan ignores SIGTERM.
DEATH_STOP_GRACE = 1.0


class _MaskSecrets(logging.Filter):
    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = mask(text, self.secrets)
        if masked != text:
            record.msg, record.args = masked, None
        if record.exc_info:  # a traceback can quote a secret too
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info),
                                   self.secrets)
            record.exc_info = None
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
    """One vLLM server jobs go to, and the child process behind it (None in external mode)."""

    target: Target
    child: VllmChild | None = None

    def exit_reason(self, timeout: float = 0) -> str | None:
        return self.child.exit_reason(timeout) if self.child else None

    def stop(self, grace: float = STOP_GRACE) -> None:
        if self.child is not None:
            self.child.stop(grace)


@dataclass(frozen=True)
class Launch:
    """How one vLLM will be started: where its weights are, what it is given, which parsers."""

    model: ModelSettings
    location: Location
    weights: str
    parsers: Choice
    argv: list[str]


# Worker settings that vLLM would misread (it uses VLLM_PORT for its own internal ports)
# or warn about, and secrets it has no use for: kept out of the child's environment.
WORKER_ONLY = ("VLLM_PORT", "VLLM_PYTHON", "VLLM_EXTRA_ARGS", "VLLM_BASE_URL",
               "VLLM_STARTUP_TIMEOUT", "LOCAL_API_KEY")


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in WORKER_ONLY}


def plan_launch(settings: Settings, model: ModelSettings, env: Mapping[str, str]) -> Launch:
    """Locate the weights, pick the parsers and build the command for one model
    (LocatorError or SettingsError when that cannot work)."""
    location = locate(model.name, model.path, settings.hf_home, settings.hub_caches)
    weights = location.model
    if location.is_local:
        weights = link_for_vllm(location.model, settings.hf_home, model.served_name)
    info = read_model_info(model.label, location.model if location.is_local else None)
    if info.generative:
        choice = choose(info, settings.enable_auto_tool_choice, settings.tool_call_parser,
                        settings.reasoning_parser)
    else:
        choice = Choice(None, None, (f"{model.label} does not generate text "
                                     f"({', '.join(info.architectures)}): no parsers",))
    limit = info.max_positions
    if model.max_model_len_is_default and limit is not None and limit < model.max_model_len:
        model = replace(model, max_model_len=limit)
        choice = replace(choice, reasons=(*choice.reasons, f"context length {limit}: the "
                                          f"longest {model.label} allows (MAX_MODEL_LEN unset)"))
    argv = build_command(settings, model, weights, count_gpus(env), choice)
    return Launch(model, location, weights, choice, argv)


def start_upstreams(settings: Settings, env: Mapping[str, str]) -> list[Upstream]:
    """Every model's vLLM started at once and healthy; StartupError (or LocatorError,
    SettingsError) otherwise, with every child stopped."""
    if settings.vllm_base_url:
        log.info("VLLM_BASE_URL is set: using the vLLM server at %s", settings.upstream_url)
        took = wait_healthy(settings.upstream_url, settings.startup_timeout)
        log.info("vLLM at %s is healthy (%.1f s)", settings.upstream_url, took)
        target = Target(settings.served_model_name, settings.upstream_url)
        return [Upstream(discover_routes(target))]
    launches = [plan_launch(settings, model, env) for model in settings.models]
    upstreams: list[Upstream] = []
    try:
        for launch in launches:
            for step in launch.location.steps + launch.parsers.reasons:
                log.info("%s", step)
            log.info("Starting vLLM for %s: %s", launch.model.served_name,
                     show(launch.argv, settings.secrets))
            child = VllmChild(launch.argv, child_env(env))
            upstreams.append(Upstream(Target(launch.model.served_name,
                                             f"http://127.0.0.1:{launch.model.port}"), child))
            child.start()
        for upstream in upstreams:  # they load in parallel: waiting in turn costs nothing
            took = wait_healthy(upstream.target.base_url, settings.startup_timeout,
                                upstream.child)
            upstream.target = discover_routes(upstream.target)
            log.info("vLLM for %s is healthy after %.1f s", upstream.target.name, took)
    except BaseException:
        stop_all(upstreams, grace=5)
        raise
    log.info("Taking jobs")
    return upstreams


def discover_routes(target: Target) -> Target:
    """The routes this vLLM serves (it mounts only those its model supports)."""
    try:
        paths = httpx.get(f"{target.base_url}/openapi.json", timeout=10).json()["paths"]
        return replace(target, routes=frozenset(paths))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        log.warning("Could not read %s/openapi.json: every route is tried", target.base_url)
        return target


def run_startup(env: Mapping[str, str] = os.environ) -> tuple[Settings, list[Upstream]]:
    """Settings, logging and healthy vLLMs; on failure, log why and exit (2: settings, 1: else)."""
    setup_logging(secret_values(env))
    try:
        settings = load(env)
    except SettingsError as exc:
        log.error("Invalid setting: %s", exc)
        sys.exit(2)
    try:
        return settings, start_upstreams(settings, env)
    except (LocatorError, StartupError, SettingsError) as exc:
        log.error("Start-up failed: %s", exc)
        sys.exit(1)


def make_proxy(settings: Settings, upstreams: Sequence[Upstream]) -> Proxy:
    pacing = Pacing(settings.stream_flush_interval, settings.min_batch_size,
                    settings.max_batch_size, settings.batch_size_growth_factor or 3.0)

    def exit_reason(timeout: float) -> str | None:
        reasons = [u.exit_reason(timeout) for u in upstreams]
        return "; ".join(f"for {u.target.name} {r}" for u, r in zip(upstreams, reasons, strict=True)
                         if r) or None

    return Proxy([u.target for u in upstreams], settings.request_timeout, pacing,
                 settings.default_max_tokens, exit_reason)


def stop_all(upstreams: Sequence[Upstream], grace: float = STOP_GRACE) -> None:
    """Stop every child at once (each gets the same grace period, not one after another)."""
    stoppers = [threading.Thread(target=u.stop, args=(grace,)) for u in upstreams]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()


class Supervision:
    """Reacts to the child's death and to stop signals; see the module docstring."""

    def __init__(self, upstreams: Sequence[Upstream], proxy: Proxy,
                 jobs_in_progress: Callable[[], int], grace: float,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.upstreams = list(upstreams)
        self.proxy = proxy
        self.jobs_in_progress = jobs_in_progress
        self.grace = grace
        self.exit_process = exit_process
        self._ending = threading.Lock()

    def watch(self) -> None:
        """Start a thread per child that notices its death."""
        for upstream in self.upstreams:
            if upstream.child is not None:
                threading.Thread(target=self._watch, args=(upstream.target.name, upstream.child),
                                 name="vllm-watch", daemon=True).start()

    def _watch(self, name: str, child: VllmChild) -> None:
        reason = child.wait()
        if child.stopping:
            return
        tail = "\n".join(f"  {line}" for line in child.tail()[-25:])
        log.error("vLLM for %s %s while serving; refusing new jobs and exiting. "
                  "Its last lines:\n%s", name, reason, tail)
        self.proxy.refusal = f"vLLM for {name} {reason}; the worker is restarting"
        self._end(DEATH_DRAIN_SECONDS, 1, DEATH_STOP_GRACE)

    def on_signal(self, signum: int) -> None:
        """Begin a graceful stop (call from a signal handler: it returns at once)."""
        log.info("%s received: finishing jobs in flight (up to %g s), then stopping vLLM",
                 signal.Signals(signum).name, self.grace)
        threading.Thread(target=self._end, args=(self.grace, 0), daemon=True).start()

    def _end(self, drain_seconds: float, code: int, stop_grace: float = STOP_GRACE) -> None:
        if not self._ending.acquire(blocking=False):
            return
        deadline = time.monotonic() + drain_seconds
        while self.jobs_in_progress() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.jobs_in_progress() > 0:
            log.warning("%d job(s) still running after %g s: stopping anyway",
                        self.jobs_in_progress(), drain_seconds)
        stop_all(self.upstreams, stop_grace)
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
