"""The worker as the HTTP server of a Runpod load-balancing endpoint.

`python handler.py` serves this when `PORT` is set and there is no job queue
(`RUNPOD_WEBHOOK_GET_JOB` unset). It listens on `0.0.0.0:$PORT` from the start,
while vLLM loads, with the limits of http_limits.py, and answers:
- `GET /ping` (also on `PORT_HEALTH`): 204 while vLLM starts, 200 once every vLLM
  is healthy, 503 once the worker stops (a vLLM died, or SIGTERM), and 503 with the reason
  when start-up failed for good (every request is then a 503 with it, for
  FAILED_START_SECONDS, until the worker exits); never waits on vLLM.
- every route of the job allowlist (requests/contract.py), with and without `/v1` as clients spell
  them: relayed to the vLLM the request's `model` names, the body as it came, the answer
  as vLLM sends it (status, content type, bytes); a stream goes out event by event as
  it arrives, whole events only, so an error after it started is an in-band event in the
  stream's format; a JSON answer goes out whole, with its length. Anything else is a
  404 that never reaches vLLM.
- beyond `MAX_CONCURRENCY` requests in flight: 429 with `Retry-After: 1` (there is no
  backlog on these endpoints: a busy worker says so at once and the client retries). A
  request takes its slot once its body has arrived whole (a body that trickles in holds a
  connection, bounded by http_limits.py, never a slot); a body cut off is never relayed;
  a client that goes away, before or after vLLM's answer began, closes the request to
  vLLM, which stops the generation.
Shutdown is the serve context's (context.py): `/ping` turns 503 and new requests are
refused at once, requests in flight get `SHUTDOWN_GRACE_PERIOD`, open streams then end
with an in-band error event, and every vLLM is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from worker.requests.contract import body_model, resolve_http
from worker.requests.errors import ProxyError, from_upstream
from worker.requests.event_reader import EventReader
from worker.requests.proxy import Proxy
from worker.requests.sse import StreamKind, error_event
from worker.serve.api_key import refusal
from worker.serve.context import Service
from worker.serve.http_limits import Server, config
from worker.settings.loader import Settings

log = logging.getLogger("worker.lb")
Scope = dict[str, Any]
JSON = [(b"content-type", b"application/json")]
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class ClientGone(Exception):
    """The client left before its request body was whole: nothing is relayed."""


async def _respond(send: Any, status: int, body: bytes = b"",
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": (headers if headers is not None else JSON)
                + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Any, error: ProxyError,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _respond(send, error.status, json.dumps(error.body()).encode(),
                   [*JSON, *(headers or [])])


class LoadBalanced:
    """The ASGI app (module docstring); `in_flight` counts the requests being answered."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/ping":  # the balancer's, every few seconds: not logged
            await self._ping(send)
            return
        started = time.perf_counter()
        status = await self._answer(scope, receive, send)
        if status is not None:
            log.info("%s %s %d %.3f s", scope["method"], scope["path"][:200], status,
                     time.perf_counter() - started)

    async def _answer(self, scope: Scope, receive: Any, send: Any) -> int | None:
        """Answer the request; its status (None when the client left first)."""
        if scope["server"] and scope["server"][1] != self.settings.port:
            return await self._refuse(send, ProxyError(404, "This port answers GET /ping only."))
        if (refused := refusal(scope["headers"], self.settings.api_key)) is not None:
            return await self._refuse(send, refused)
        if not self.service.ready or self.service.proxy is None:
            return await self._refuse(send, ProxyError(503, self._not_ready()))
        if (busy := self._busy()) is not None:  # at once: no body is read for nothing
            return await self._refuse(send, busy, [(b"retry-after", b"1")])
        proxy = self.service.proxy
        try:
            body = await _read_body(receive, self.settings.local_max_body_bytes) \
                if scope["method"] == "POST" else None
        except ProxyError as error:
            return await self._refuse(send, error)
        except ClientGone:
            log.info("%s %s: the client left before its body was whole; nothing was relayed",
                     scope["method"], scope["path"][:200])
            return None
        if (busy := self._busy()) is not None:
            return await self._refuse(send, busy, [(b"retry-after", b"1")])
        self.in_flight += 1
        try:
            return await _until_gone(
                receive, send, lambda sending: self._forward(scope, body, sending, proxy))
        finally:
            self.in_flight -= 1

    def _busy(self) -> ProxyError | None:
        if self.in_flight < self.settings.max_concurrency:
            return None
        return ProxyError(429, f"The worker is answering {self.in_flight} requests "
                               "(MAX_CONCURRENCY); retry.")

    @staticmethod
    async def _refuse(send: Any, error: ProxyError,
                      headers: list[tuple[bytes, bytes]] | None = None) -> int:
        await _error(send, error, headers)
        return error.status

    async def _ping(self, send: Any) -> int:
        if self.service.ready:
            await _respond(send, 200, b'{"status":"healthy"}')
            return 200
        if self.service.failure is not None:
            await _respond(send, 503, json.dumps(
                {"status": "failed", "error": self.service.failure.sentence}).encode())
            return 503
        if self.service.stopping:
            await _respond(send, 503, b'{"status":"stopping"}')
            return 503
        await _respond(send, 204, b"", [])
        return 204

    def _not_ready(self) -> str:
        if self.service.failure is not None:
            return f"The worker could not start: {self.service.failure.sentence}"
        if self.service.stopping:
            return "The worker is stopping: it takes no new requests."
        return "vLLM is still starting on this worker; retry once /ping answers 200."

    async def _forward(self, scope: Scope, body: bytes | None, send: Any, proxy: Proxy
                       ) -> int:
        try:
            model = body_model(body) if body and (len(proxy.targets) > 1 or proxy.loader) \
                else None
            if proxy.loader is not None:
                await proxy.loader.ensure(model)
            request = resolve_http(scope["method"], scope["path"], model, proxy.targets)
            if request.path == "/v1/models" and len(proxy.targets) > 1:
                models = [m async for m in proxy.run({"openai_route": "/v1/models"})][0]
                await _respond(send, 200, json.dumps(models).encode())
                return 200
            response = await proxy.open(request, body, scope["query_string"])
        except ProxyError as error:
            return await self._refuse(send, error)
        try:
            return await _relay(response, request.kind, send, proxy)
        finally:
            await response.aclose()


async def _relay(response: httpx.Response, kind: StreamKind, send: Any, proxy: Proxy) -> int:
    """vLLM's answer: an error as the error it is; a JSON body whole, with its length; a
    stream as its events arrive, and a failure after it started in its own format."""
    content_type = response.headers.get("content-type", "application/json")
    if response.status_code >= 400 or "text/event-stream" not in content_type:
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:
            error = await proxy.transport_error(exc)
            await _error(send, error)
            return error.status
        if response.status_code >= 400:
            error = from_upstream(response.status_code, content)
            await _error(send, error)
            return error.status
        await _respond(send, response.status_code, content,
                       [(b"content-type", content_type.encode())])
        return response.status_code
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [(b"content-type", content_type.encode()), *STREAM_HEADERS]})
    async with EventReader(response, proxy) as events:
        async for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if events.failure is not None:
        log.warning("stream interrupted after it started: %s", events.failure.message)
        await send({"type": "http.response.body", "more_body": True,
                    "body": error_event(kind, events.failure).encode()})
    await send({"type": "http.response.body", "body": b""})
    return response.status_code


async def _until_gone(receive: Any, send: Any,
                      answer: Callable[[Any], Awaitable[int]]) -> int | None:
    """`answer(send)` until it ends or the client goes away, whichever comes first: closing
    the request to vLLM then makes vLLM abort the generation, whether its answer had begun
    or not. Its status, or None when the client left."""
    task = asyncio.current_task()
    assert task is not None
    answered = gone = False

    async def sending(message: dict[str, Any]) -> None:
        nonlocal answered
        answered = message["type"] == "http.response.body" and not message.get("more_body")
        await send(message)

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        if not answered:  # uvicorn says "disconnect" once the answer is complete, too
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await answer(sending)
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        log.info("the client left: its request to vLLM was closed")
        return None
    finally:
        watcher.cancel()


async def _read_body(receive: Any, limit: int) -> bytes:
    """The whole request body; ClientGone when the client left (or was timed out) before it
    was whole, so that a body cut off is never taken for a complete one."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes "
                                  "(LOCAL_MAX_BODY_MB).")
        if not message.get("more_body"):
            return bytes(body)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))  # noqa: S104 (Runpod's balancer reaches the worker here)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(service: Service) -> None:
    """Serve the load-balancing endpoint until told to stop (the serve context exits); the
    service starts in the background meanwhile (`Service.start_in_background`)."""
    settings = service.settings
    assert settings.port is not None
    app = LoadBalanced(service)
    service.in_flight = lambda: app.in_flight
    ports = sorted({settings.port, settings.port_health or settings.port})
    sockets = [_listen(port) for port in ports]
    log.info("Listening on 0.0.0.0:%s (/ping on %s)", settings.port, settings.port_health)
    if settings.api_key is None:
        (log.warning if settings.local_api_key else log.info)(
            "This server asks no API key of its own%s: anyone who reaches port %s may use "
            "it (Runpod's balancer asks callers for the Runpod API key first); set API_KEY "
            "to require one", " (LOCAL_API_KEY guards the local endpoint only)"
            if settings.local_api_key else "", settings.port)
    with contextlib.suppress(KeyboardInterrupt):
        Server(config(app, backlog=2048)).run(sockets=sockets)
