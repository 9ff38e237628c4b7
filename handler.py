"""The Runpod serverless worker: `python handler.py`.

A queue endpoint's worker (the platform's job URL, `RUNPOD_WEBHOOK_GET_JOB`, is set):
start-up happens before the first job (worker/serve/context.py): settings, weights, every vLLM
started on loopback and healthy; only then is the handler given to the Runpod SDK,
which takes jobs as soon as it starts. A load-balancing endpoint's worker (`PORT` set
and no job URL): the HTTP server of worker/serve/load_balancer.py, listening while vLLM starts.

`make_handler(proxy)` is the job handler: an async generator (the SDK streams
what it yields and, with `return_aggregate_stream`, returns the list of yields
from /run and /runsync). What it accepts and yields is documented in
worker/requests/contract.py and proxy.py. Importing this module has no side effects.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from worker.serve.context import Service, load_settings, serving

if TYPE_CHECKING:  # imported while vLLM loads (the pool: httpx, aiohttp), not before
    from worker.requests.proxy import Proxy
    from worker.requests.relay import Pacing
    from worker.upstream.verdicts import Verdict

log = logging.getLogger("worker")
Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]
SPAWN_FIRST = 1.0  # s the load-balancing server waits for vLLM's spawn before its imports


def make_handler(proxy: Proxy, pacing: Pacing | None = None) -> Handler:
    """The job handler the Runpod SDK calls, relaying each job through `proxy` (its streams
    paced by `pacing`, the proxy's own by default)."""

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        async for item in proxy.run(job.get("input"), str(job.get("id", "-")), pacing):
            yield item

    return handler


def failed_handler(verdict: Verdict) -> Handler:
    """The job handler of a worker whose start-up failed for good: every job fails at once
    with the reason, rather than wait for a worker that will fail the same way again."""
    from worker.requests.errors import ProxyError

    failure = ProxyError(503, f"The worker could not start: {verdict.sentence}")

    async def handler(job: dict[str, Any]) -> AsyncIterator[Any]:
        log.warning("job %s: failed at once: the worker could not start", job.get("id", "-"))
        yield failure.job_output()

    return handler


def _sdk_jobs_in_progress() -> int:
    from runpod.serverless.modules.worker_state import JobsProgress

    return JobsProgress().get_job_count()


def _import_meanwhile() -> None:
    """What the queue worker needs only once vLLM is healthy, imported while it loads: the
    pool to vLLM and the Runpod SDK (over a second: py-cpuinfo, aiohttp)."""
    importlib.import_module("worker.requests.proxy")
    _import_sdk()


def _import_sdk() -> None:
    # The SDK logs every yielded item at DEBUG, its default level: users' prompts and
    # answers would fill the log. INFO unless the deployment asks for more.
    # Importing the SDK calls logging.basicConfig, a no-op once the root logger has a
    # handler: ours (secrets masked) is set first (load_settings), or the SDK's would print
    # them unmasked.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    importlib.import_module("runpod")


def serve_jobs(service: Service) -> None:
    """Take jobs from the Runpod queue until told to stop."""
    import runpod

    assert service.proxy is not None
    service.in_flight = _sdk_jobs_in_progress

    def concurrency_modifier(current: int) -> int:
        # The SDK installs its own SIGTERM/SIGINT handlers when its job loop starts,
        # replacing ours; this is its first call from inside that loop, so the graceful
        # stop is chained before them here (once: the call is idempotent).
        service.handle_signals()
        return service.settings.max_concurrency

    runpod.serverless.start({"handler": make_handler(service.proxy),
                             "return_aggregate_stream": True,
                             "concurrency_modifier": concurrency_modifier})


def fail_jobs(verdict: Verdict, concurrency: int) -> None:
    """Take jobs from the Runpod queue and fail each with `verdict` (until the serve
    context ends the process)."""
    _import_sdk()
    import runpod

    runpod.serverless.start({"handler": failed_handler(verdict), "return_aggregate_stream": True,
                             "concurrency_modifier": lambda current: concurrency})


def main() -> None:
    settings = load_settings(os.environ)
    if settings.load_balancing:
        log.info("Serving a load-balancing endpoint on port %s: PORT is set and there is no "
                 "job queue (RUNPOD_WEBHOOK_GET_JOB is unset)", settings.port)
        service = Service(settings, os.environ, tell_failure=lambda verdict: None)  # /ping
        service.handle_signals()
        service.start_in_background(lambda: log.info("Ready: /ping answers 200"))
        service.spawned.wait(SPAWN_FIRST)  # the server's own imports come after the spawn
        from worker.serve import load_balancer

        load_balancer.serve(service)
        return
    log.info("Taking jobs from the Runpod queue: %s", "RUNPOD_WEBHOOK_GET_JOB is set"
             if os.environ.get("RUNPOD_WEBHOOK_GET_JOB") else "PORT is not set")
    with serving(os.environ, settings, _import_meanwhile,
                 lambda verdict: fail_jobs(verdict, settings.max_concurrency)) as service:
        serve_jobs(service)


if __name__ == "__main__":
    main()
