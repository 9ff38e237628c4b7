"""The Runpod serverless worker: `python handler.py`.

Start-up (before the first job): read the settings, find the weights, start
vLLM's OpenAI server as a supervised child on loopback, wait until it is
healthy, and only then hand `handler` to the Runpod SDK.

`handler(job)` is an async generator (the SDK streams what it yields and, with
`return_aggregate_stream`, returns the list of yields from /run and /runsync).
What it accepts and yields is documented in routes.py and proxy.py. Importing
this module has no side effects: the proxy is built on first use, from the
environment, unless `configure` set one.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from typing import Any

from proxy import Proxy
from routes import Target
from settings import load, secret_values
from startup import Supervision, Upstream, make_proxy, run_startup, setup_logging, stop_all

log = logging.getLogger("worker")
_proxy: Proxy | None = None


def configure(proxy: Proxy | None) -> Proxy | None:
    """Use `proxy` for every job from now on."""
    global _proxy
    _proxy = proxy
    return proxy


def current_proxy() -> Proxy:
    """The configured proxy, else one for the vLLM server the environment names."""
    if _proxy is None:
        settings = load(os.environ)
        target = Target(settings.served_model_name, settings.upstream_url)
        configure(make_proxy(settings, [Upstream(target)]))
    assert _proxy is not None
    return _proxy


async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
    """Proxy one Runpod job to vLLM and yield its answer (see proxy.py)."""
    async for item in current_proxy().run(job.get("input"), str(job.get("id", "-"))):
        yield item


def _sdk_jobs_in_progress() -> int:
    from runpod.serverless.modules.worker_state import JobsProgress

    return JobsProgress().get_job_count()


def _unwind_on_sigterm() -> None:
    """Until the SDK installs its handlers, make SIGTERM raise SystemExit.

    Python's default action would end the worker at once and leave vLLM, in its own
    process group, running; unwinding lets start_upstreams (or main's `finally`) stop it.
    """
    main_pid = os.getpid()

    def unwind(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:  # not in the SDK's heartbeat process, forked later
            log.info("SIGTERM received before serving: stopping vLLM")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, unwind)


def _import_sdk_meanwhile() -> threading.Thread:
    """Import the Runpod SDK in a thread while vLLM loads: the import takes over a second
    (py-cpuinfo, aiohttp), which would otherwise come after vLLM is healthy."""
    # The SDK logs every yielded item at DEBUG, its default level: users' prompts and
    # answers would fill the log. INFO unless the deployment asks for more.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    # Importing the SDK calls logging.basicConfig, a no-op once the root logger has a
    # handler: set ours (secrets masked) first, or the SDK's would print them unmasked.
    setup_logging(secret_values(os.environ))
    sdk = threading.Thread(target=importlib.import_module, args=("runpod",), daemon=True)
    sdk.start()
    return sdk


def main() -> None:
    """Start vLLM, then serve jobs through the Runpod SDK until told to stop."""
    _unwind_on_sigterm()
    sdk = _import_sdk_meanwhile()
    try:
        settings, upstreams = run_startup()
    finally:
        sdk.join()  # a failed start must not exit while py-cpuinfo's helper process runs
    proxy = configure(make_proxy(settings, upstreams))
    assert proxy is not None
    supervision = Supervision(upstreams, proxy, _sdk_jobs_in_progress,
                              settings.shutdown_grace_period)
    supervision.watch()
    signals_chained = False

    def concurrency_modifier(current: int) -> int:
        # Called by the SDK inside its loop, after it installed its own signal
        # handlers: the first call adds the grace-period stop behind them.
        nonlocal signals_chained
        if not signals_chained:
            supervision.chain_signals()
            signals_chained = True
        return settings.max_concurrency

    import runpod

    try:
        runpod.serverless.start({"handler": handler, "return_aggregate_stream": True,
                                 "concurrency_modifier": concurrency_modifier})
    finally:
        stop_all(upstreams)


if __name__ == "__main__":
    main()
