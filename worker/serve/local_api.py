"""Runpod's public endpoint API, in front of the job handler: the local endpoint's app.

For any endpoint id it serves

    POST /v2/<id>/runsync | /run          GET|POST /v2/<id>/status/<job> | /stream/<job>
    POST /v2/<id>/cancel/<job> | /purge-queue    GET /v2/<id>/health
    GET|POST /v2/<id>/openai/v1/<path>    (wrapped into the openai_route job the platform sends)

Jobs run through the handler as the Runpod SDK runs them (job_table.py). The OpenAI
path answers as an OpenAI server: SSE written as each yield comes, JSON otherwise, and a
failed job's HTTP status and error body; a client that goes away cancels its job. Its job
runs in the request's own task, with no router, queue or extra task between the handler's
yields and the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from worker.requests.errors import ProxyError, error_body, parse_job_error
from worker.serve.api_key import refusal
from worker.serve.job_table import Handler, Job, Jobs

log = logging.getLogger("worker.local")
STREAM_POLL_SECONDS = 5.0  # /stream waits this long for news (the runpod client times out at 10)
RUNSYNC_WAIT_MS = 90_000  # /runsync's default wait, as Runpod's
OPENAI_PATH = re.compile(r"/v2/[^/]+/openai/v1/")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class RequireKey:
    """Answer a request without the key (api_key.py) before anything else reads it."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refused := refusal(scope["headers"], self.key)):
            await JSONResponse(refused.body(), refused.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The client left before its request body was whole: no job is made of it."""


async def _read_json(request: Request, limit: int) -> Any:
    if int(request.headers.get("content-length") or 0) > limit:
        raise ProxyError(413, f"The request body is larger than {limit} bytes.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ProxyError(413, f"The request body is larger than {limit} bytes.")
    except ClientDisconnect:  # never taken for a whole body (http_limits.py times it)
        raise ClientGone from None
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ProxyError(400, f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:  # valid JSON, but deeper than Python's parser goes
        raise ProxyError(400, "The request body is JSON nested too deeply to read.") from None


def _wait_seconds(request: Request) -> float:
    """/runsync's `?wait=` in seconds: whole milliseconds, 1000 to 300000, as Runpod takes."""
    raw = request.query_params.get("wait", str(RUNSYNC_WAIT_MS))
    if not raw.isdigit() or not 1000 <= int(raw) <= 300_000:
        raise ProxyError(400, f"wait={raw[:40]!r} is not valid: it must be a whole number of "
                              "milliseconds from 1000 to 300000.", "wait")
    return int(raw) / 1000


class Endpoint:
    """The endpoint's ASGI app (`app`) around a job table. While `stopping()`, new jobs are
    refused with a 503 and status, stream and cancel calls still work; `in_flight` counts
    the jobs not yet ended (an OpenAI-path job ends once its answer is written), for the
    drain."""

    def __init__(self, jobs: Jobs, api_key: str | None = None, max_body: int = 20 << 20,
                 stopping: Callable[[], bool] = lambda: False, direct: Handler | None = None
                 ) -> None:
        self.jobs = jobs
        self.direct = direct  # the handler of the OpenAI path: no pacing (relay.py)
        self.max_body = max_body
        self.stopping = stopping
        base = "/v2/{endpoint_id}"
        routes = [
            Route(f"{base}/run", self._guarded(self.run), methods=["POST"]),
            Route(f"{base}/runsync", self._guarded(self.runsync), methods=["POST"]),
            Route(f"{base}/status/{{job_id}}", self._guarded(self.status),
                  methods=["GET", "POST"]),
            Route(f"{base}/stream/{{job_id}}", self._guarded(self.stream),
                  methods=["GET", "POST"]),
            Route(f"{base}/cancel/{{job_id}}", self._guarded(self.cancel), methods=["POST"]),
            Route(f"{base}/purge-queue", self._guarded(self.purge_queue), methods=["POST"]),
            Route(f"{base}/health", self._guarded(self.health), methods=["GET"]),
        ]
        self.runpod_api = Starlette(routes=routes)
        self.app: ASGIApp = RequireKey(self._dispatch, api_key)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The OpenAI path straight to `openai` (no routing or middleware on every token's
        way), the Runpod API through starlette."""
        openai = OPENAI_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if openai is not None:
            await self.openai(scope, receive, send, "/v1/" + scope["path"][openai.end():])
        else:
            await self.runpod_api(scope, receive, send)

    def in_flight(self) -> int:
        return self.jobs.unfinished()

    @staticmethod
    def _guarded(endpoint: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except ProxyError as exc:
                return JSONResponse(exc.body(), exc.status)
            except ClientGone:  # nobody reads the answer: it only ends the request
                log.info("%s: the client left before its body was whole; no job was made",
                         request.url.path[:200])
                return Response(status_code=400)
        return answer

    def _submit(self, job_input: Any, route: str) -> Job:
        if self.stopping():
            raise ProxyError(503, "The worker is stopping: it takes no new jobs.")
        return self.jobs.submit(job_input, route)

    async def _body_input(self, request: Request) -> Any:
        body = await _read_json(request, self.max_body)
        if not isinstance(body, dict) or "input" not in body:
            raise ProxyError(400, 'The request body must be {"input": {...}}.')
        return body["input"]

    def _find(self, request: Request) -> Job:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            raise ProxyError(404, f"No job {request.path_params['job_id']!r} on this endpoint.")
        return job

    async def run(self, request: Request) -> Response:
        job = self._submit(await self._body_input(request), "/run")
        return JSONResponse({"id": job.id, "status": job.status})

    async def runsync(self, request: Request) -> Response:
        wait = _wait_seconds(request)
        job = self._submit(await self._body_input(request), "/runsync")
        await job.wait(lambda: job.done, wait)
        return JSONResponse(job.view())

    async def status(self, request: Request) -> Response:
        return JSONResponse(self._find(request).view())

    async def stream(self, request: Request) -> Response:
        job = self._find(request)
        await job.wait(lambda: job.has_new() or job.done, STREAM_POLL_SECONDS)
        shown = {"status": job.status, "stream": [{"output": item} for item in job.take_new()]}
        if job.error is not None:
            shown["error"] = job.error
        return JSONResponse(shown)

    async def cancel(self, request: Request) -> Response:
        job = self._find(request)
        await self.jobs.cancel(job)
        return JSONResponse({"id": job.id, "status": job.status})

    async def purge_queue(self, request: Request) -> Response:
        return JSONResponse({"removed": self.jobs.cancel_queued(), "status": "completed"})

    async def health(self, request: Request) -> Response:
        counts = self.jobs.counts()
        running = counts["inProgress"]
        return JSONResponse({"jobs": counts,
                             "workers": {"idle": int(running == 0), "running": int(running > 0)}})

    async def openai(self, scope: Scope, receive: Receive, send: Send, route: str) -> None:
        """The OpenAI path, in the request's own task: the job's items are written as the
        handler yields them (SSE), or its one JSON body, or its error's status and body."""
        job_input: dict[str, Any] = {"openai_route": route}
        try:
            if scope["method"] not in ("GET", "POST"):
                raise ProxyError(405, f"{scope['method']} is not allowed here: use GET or POST.")
            if scope["method"] == "POST":
                job_input["openai_input"] = await _read_json(Request(scope, receive),
                                                             self.max_body)
            if self.stopping():
                raise ProxyError(503, "The worker is stopping: it takes no new jobs.")
        except ProxyError as exc:
            await JSONResponse(exc.body(), exc.status)(scope, receive, send)
            return
        except ClientGone:
            log.info("%s: the client left before its body was whole; no job was made", route)
            return
        job = self.jobs.open(job_input, "/openai" + route)
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_until_gone(receive, gone, task))
        started, first = False, None
        try:
            async with contextlib.aclosing(self.jobs.follow(job, self.direct)) as items:
                first = await anext(items, None)
                if isinstance(first, str):
                    await send({"type": "http.response.start", "status": 200,
                                "headers": SSE_HEADERS})
                    started = True
                    if first:
                        await _write(send, first)
                    async for item in items:
                        await _write(send, item if isinstance(item, str)
                                     else f"data: {json.dumps(item)}\n\n")
                    if job.error is not None:
                        await _write(send, f"data: {job.error}\n\n")
                else:
                    async for _ in items:  # a JSON answer is one item; the job ends here
                        pass
        except asyncio.CancelledError:
            if not (gone.is_set() or job.dropped):
                raise
            task.uncancel()
            if gone.is_set():
                return
        finally:
            watcher.cancel()
            self.jobs.close(job)
        if started:
            await send({"type": "http.response.body", "body": b""})
        elif first is not None and job.status == "COMPLETED":
            await JSONResponse(first)(scope, receive, send)
        elif job.status == "CANCELLED":
            await _error(503, "The job was cancelled.")(scope, receive, send)
        else:
            code, body = parse_job_error(job.error or "")
            await JSONResponse(body, code)(scope, receive, send)


async def _write(send: Send, text: str) -> None:
    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})


async def _until_gone(receive: Receive, gone: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Cancel `task` when its client goes away (its job is then cancelled)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    task.cancel()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, message), status)
