"""Runpod's public endpoint API on one machine, in front of the handler the platform calls.

`python local_endpoint.py [--host 127.0.0.1] [--port 8080]` runs the worker's
real start-up (settings, locate, spawn vLLM or use `VLLM_BASE_URL`, wait for
health, supervision), then serves, for any endpoint id:

    POST /v2/<id>/runsync | /run          GET|POST /v2/<id>/status/<job> | /stream/<job>
    POST /v2/<id>/cancel/<job> | /purge-queue    GET /v2/<id>/health
    GET|POST /v2/<id>/openai/v1/<path>    (wrapped into the openai_route job the platform sends)

Jobs run through the handler as the Runpod SDK runs them (`local_jobs.py`). The
OpenAI path answers as an OpenAI server: SSE written as each yield comes, JSON
otherwise, and a failed job's HTTP status and error body; a client that goes away
cancels its job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

import handler
from errors import ProxyError, error_body, parse_job_error
from local_jobs import Job, Jobs

log = logging.getLogger("worker.local")
STREAM_POLL_SECONDS = 5.0  # /stream waits this long for news (the runpod client times out at 10)


class RequireKey:
    """Answer 401 to any request without `Authorization: Bearer <key>` (constant-time check)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body(401, "Missing or wrong API key: send 'Authorization: Bearer "
                                       "<key>'.")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status)


async def _read_json(request: Request, limit: int) -> Any:
    if int(request.headers.get("content-length") or 0) > limit:
        raise ProxyError(413, f"The request body is larger than {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes.")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ProxyError(400, f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:  # valid JSON, but deeper than Python's parser goes
        raise ProxyError(400, "The request body is JSON nested too deeply to read.") from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, waiting: Awaitable[Any]) -> bool:
    """Await `waiting`; False (and it cancelled) if the client goes away first."""
    work = asyncio.ensure_future(waiting)
    gone = asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()
    return work.done() and not work.cancelled()


def build_app(jobs: Jobs, api_key: str | None = None, max_body: int = 20 << 20,
              on_shutdown: Callable[[], Awaitable[None]] | None = None) -> ASGIApp:
    """The endpoint's ASGI app around a job runner."""

    async def body_input(request: Request) -> Any:
        body = await _read_json(request, max_body)
        if not isinstance(body, dict) or "input" not in body:
            raise ProxyError(400, 'The request body must be {"input": {...}}.')
        return body["input"]

    async def run(request: Request) -> Response:
        job = jobs.submit(await body_input(request), "/run")
        return JSONResponse({"id": job.id, "status": job.status})

    async def runsync(request: Request) -> Response:
        job = jobs.submit(await body_input(request), "/runsync")
        wait = float(request.query_params.get("wait", 90000)) / 1000
        await job.wait(lambda: job.done, min(max(wait, 0), 300))
        return JSONResponse(job.view())

    def find(request: Request) -> Job:
        job = jobs.jobs.get(request.path_params["job_id"])
        if job is None:
            raise ProxyError(404, f"No job {request.path_params['job_id']!r} on this endpoint.")
        return job

    async def status(request: Request) -> Response:
        return JSONResponse(find(request).view())

    async def stream(request: Request) -> Response:
        job = find(request)
        await job.wait(lambda: len(job.items) > job.streamed or job.done, STREAM_POLL_SECONDS)
        new = job.items[job.streamed:]
        job.streamed += len(new)
        shown = {"status": job.status, "stream": [{"output": item} for item in new]}
        if job.error is not None:
            shown["error"] = job.error
        return JSONResponse(shown)

    async def cancel(request: Request) -> Response:
        job = find(request)
        if job.task is not None and not job.done:
            job.task.cancel()
            await job.wait(lambda: job.done)
        return JSONResponse({"id": job.id, "status": job.status})

    async def purge_queue(request: Request) -> Response:
        queued = [job for job in jobs.jobs.values() if job.status == "IN_QUEUE"]
        for job in queued:
            if job.task is not None:
                job.task.cancel()
        return JSONResponse({"removed": len(queued), "status": "completed"})

    async def health(request: Request) -> Response:
        running = jobs.counts()["inProgress"]
        return JSONResponse({"jobs": jobs.counts(),
                             "workers": {"idle": int(running == 0), "running": int(running > 0)}})

    async def openai(request: Request) -> Response:
        route = "/v1/" + request.path_params["path"]
        job_input: dict[str, Any] = {"openai_route": route}
        if request.method == "POST":
            job_input["openai_input"] = await _read_json(request, max_body)
        job = jobs.submit(job_input, "/openai" + route)
        started = await _unless_disconnected(request, job.wait(lambda: bool(job.items) or job.done))
        if not started:
            return _cancelled(job)
        if not job.items:
            if job.status == "CANCELLED":
                return _error(503, "The job was cancelled.")
            code, body = parse_job_error(job.error or "")
            return JSONResponse(body, code)
        if isinstance(job.items[0], str):
            return StreamingResponse(_relay(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        if not await _unless_disconnected(request, job.wait(lambda: job.done)):
            return _cancelled(job)
        return JSONResponse(job.items[0])

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ProxyError as exc:
                return JSONResponse(exc.body(), exc.status)
        return answer

    base = "/v2/{endpoint_id}"
    routes = [
        Route(f"{base}/run", guarded(run), methods=["POST"]),
        Route(f"{base}/runsync", guarded(runsync), methods=["POST"]),
        Route(f"{base}/status/{{job_id}}", guarded(status), methods=["GET", "POST"]),
        Route(f"{base}/stream/{{job_id}}", guarded(stream), methods=["GET", "POST"]),
        Route(f"{base}/cancel/{{job_id}}", guarded(cancel), methods=["POST"]),
        Route(f"{base}/purge-queue", guarded(purge_queue), methods=["POST"]),
        Route(f"{base}/health", guarded(health), methods=["GET"]),
        Route(f"{base}/openai/v1/{{path:path}}", guarded(openai), methods=["GET", "POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await on_shutdown()

    return RequireKey(Starlette(routes=routes, lifespan=lifespan), api_key)


def _cancelled(job: Job) -> Response:
    if job.task is not None:
        job.task.cancel()
    return Response(status_code=499)


async def _relay(job: Job) -> AsyncIterator[str]:
    """A job's yields as they come; the client going away cancels the job."""
    sent = 0

    def more() -> bool:
        return len(job.items) > sent or job.done

    try:
        while True:
            await job.wait(more)
            while sent < len(job.items):
                item = job.items[sent]
                sent += 1
                yield item if isinstance(item, str) else f"data: {json.dumps(item)}\n\n"
            if job.done:
                if job.error is not None:
                    yield f"data: {job.error}\n\n"
                return
    finally:
        if job.task is not None and not job.done:
            job.task.cancel()


class _Server(uvicorn.Server):
    """uvicorn, announcing the base URL once the socket listens."""

    banner = ""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, flush=True)


def _banner(host: str, port: int, model: str, api_key: str | None) -> str:
    base = f"http://{host}:{port}/v2/local"
    auth = ' -H "Authorization: Bearer $LOCAL_API_KEY"' if api_key else ""
    return (f"\nLocal endpoint ready, serving {model}\n"
            f"  Runpod API:     {base}/runsync  (/run, /status/<id>, /stream/<id>, /cancel/<id>)\n"
            f"  OpenAI base URL: {base}/openai/v1\n"
            f"  Try: curl -s {base}/openai/v1/chat/completions{auth} "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
            f"\"max_tokens\": 20}}'\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    from startup import Supervision, make_proxy, run_startup, stop_all

    settings, upstreams = run_startup()
    proxy = handler.configure(make_proxy(settings, upstreams))
    assert proxy is not None
    jobs = Jobs(handler.handler, settings.max_concurrency)
    Supervision(upstreams, proxy, jobs.unfinished, settings.shutdown_grace_period).watch()

    async def drain() -> None:
        deadline = time.monotonic() + settings.shutdown_grace_period
        while jobs.unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(jobs.jobs.values()):
            if job.task is not None and not job.done:
                job.task.cancel()
        await proxy.aclose()

    app = build_app(jobs, settings.local_api_key, settings.local_max_body_bytes, drain)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    timeout_graceful_shutdown=settings.shutdown_grace_period))
    server.banner = _banner(args.host, args.port, settings.served_model_name,
                            settings.local_api_key)
    # uvicorn re-raises the stop signal after its graceful shutdown: let that return here.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        server.run()
    finally:
        log.info("Stopping vLLM")
        stop_all(upstreams)
    sys.exit(0 if server.started else 1)


if __name__ == "__main__":
    main()
