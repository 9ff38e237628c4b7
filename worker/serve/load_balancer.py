"""The worker as the HTTP server of a Runpod load-balancing endpoint.

`python handler.py` serves this when `PORT` is set and there is no job queue
(`RUNPOD_WEBHOOK_GET_JOB` unset). It listens on `0.0.0.0:$PORT` from the start,
while vLLM loads, with the limits of http_limits.py, and answers:
- `GET /ping` (also on `PORT_HEALTH`): 204 while vLLM starts, 200 once every vLLM
  is healthy, 503 once the worker stops (a vLLM died, or SIGTERM); never waits on vLLM.
- every route of the job allowlist (requests/contract.py), with and without `/v1` as clients spell
  them: relayed to the vLLM the request's `model` names, the body as it came, the answer
  as vLLM sends it (status, content type, bytes); a stream goes out event by event as
  it arrives, whole events only, so an error after it started is an in-band event in the
  stream's format. Anything else is a 404 that never reaches vLLM; a client that goes
  away closes the request to vLLM, which stops the generation.
- beyond `MAX_CONCURRENCY` requests in flight: 429 with `Retry-After: 1` (there is no
  backlog on these endpoints: a busy worker says so at once and the client retries).
Shutdown is the serve context's (context.py): `/ping` turns 503 and new requests are
refused at once, requests in flight get `SHUTDOWN_GRACE_PERIOD`, open streams then end
with an in-band error event, and every vLLM is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any

import httpx

from worker.requests.contract import body_model, resolve_http
from worker.requests.errors import ProxyError, from_upstream
from worker.requests.proxy import Proxy
from worker.requests.sse import StreamKind, error_event, event_end
from worker.serve.context import Service
from worker.serve.http_limits import Server, config
from worker.settings.loader import Settings

log = logging.getLogger("worker.lb")
Scope = dict[str, Any]
JSON = [(b"content-type", b"application/json")]
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


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


class Stream:
    """One answer being relayed by the task that runs it: the shutdown (`interrupt`) or
    the client going away (`leave`) cancels that task's read of vLLM's answer."""

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.interrupted = False
        self.gone = False

    def interrupt(self) -> None:
        self.interrupted = True
        if self.task is not None:
            self.task.cancel()

    def leave(self) -> None:
        self.gone = True
        if self.task is not None:
            self.task.cancel()


class LoadBalanced:
    """The ASGI app (module docstring); `in_flight` counts the requests being answered."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.in_flight = 0
        key = self.settings.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/ping":
            await self._ping(send)
        elif scope["server"] and scope["server"][1] != self.settings.port:
            await _error(send, ProxyError(404, "This port answers GET /ping only."))
        elif self.expected is not None and not hmac.compare_digest(
                dict(scope["headers"]).get(b"authorization", b""), self.expected):
            await _error(send, ProxyError(401, "Missing or wrong API key: send "
                                               "'Authorization: Bearer <key>'."))
        elif not self.service.ready or self.service.proxy is None:
            await _error(send, ProxyError(503, self._not_ready()))
        elif self.in_flight >= self.settings.max_concurrency:
            await _error(send, ProxyError(429, f"The worker is answering "
                                               f"{self.in_flight} requests (MAX_CONCURRENCY); "
                                               "retry."), [(b"retry-after", b"1")])
        else:
            self.in_flight += 1
            try:
                await self._forward(scope, receive, send, self.service.proxy)
            finally:
                self.in_flight -= 1

    async def _ping(self, send: Any) -> None:
        if self.service.ready:
            await _respond(send, 200, b'{"status":"healthy"}')
        elif self.service.stopping:
            await _respond(send, 503, b'{"status":"stopping"}')
        else:
            await _respond(send, 204, b"", [])

    def _not_ready(self) -> str:
        if self.service.stopping:
            return "The worker is stopping: it takes no new requests."
        return "vLLM is still starting on this worker; retry once /ping answers 200."

    async def _forward(self, scope: Scope, receive: Any, send: Any, proxy: Proxy) -> None:
        started = time.perf_counter()
        try:
            body = await _read_body(receive, self.settings.local_max_body_bytes) \
                if scope["method"] == "POST" else None
            model = body_model(body) if body and (len(proxy.targets) > 1 or proxy.loader) else None
            if proxy.loader is not None:
                await proxy.loader.ensure(model)
            request = resolve_http(scope["method"], scope["path"], model, proxy.targets)
            if request.path == "/v1/models" and len(proxy.targets) > 1:
                models = [m async for m in proxy.run({"openai_route": "/v1/models"})][0]
                await _respond(send, 200, json.dumps(models).encode())
                _log(scope, 200, started)
                return
            response = await proxy.open(request, body, scope["query_string"])
        except ProxyError as error:
            await _error(send, error)
            _log(scope, error.status, started)
            return
        try:
            await self._relay(response, request.kind, receive, send, proxy)
        finally:
            await response.aclose()
            _log(scope, response.status_code, started)

    async def _relay(self, response: httpx.Response, kind: StreamKind, receive: Any,
                     send: Any, proxy: Proxy) -> None:
        """vLLM's answer, as it comes; an error once started in the stream's own format."""
        if response.status_code >= 400:
            await _error(send, from_upstream(response.status_code, await response.aread()))
            return
        content_type = response.headers.get("content-type", "application/json")
        streaming = "text/event-stream" in content_type
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", content_type.encode()),
                                *(STREAM_HEADERS if streaming else [])]})
        stream = Stream()
        watcher = asyncio.ensure_future(_until_gone(receive, stream))
        pending = b""
        failure: ProxyError | None = None
        try:
            with proxy.tracking(stream) if streaming else contextlib.nullcontext():
                async for chunk in response.aiter_raw():
                    if not streaming:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                        continue
                    pending += chunk
                    end = len(pending) if pending.endswith(b"\n\n") else event_end(pending)
                    if end:
                        await send({"type": "http.response.body", "body": pending[:end],
                                    "more_body": True})
                        pending = pending[end:]
            if pending.strip():
                failure = ProxyError(502, f"vLLM's stream ended in the middle of an event "
                                          f"({len(pending)} bytes cut off).")
        except asyncio.CancelledError:
            if not (stream.gone or stream.interrupted):
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if stream.gone:
                return
            failure = ProxyError(503, proxy.closing or "The stream was ended by the worker.")
        except httpx.HTTPError as exc:
            failure = await proxy.transport_error(exc)
        finally:
            watcher.cancel()
        if failure is not None:
            log.warning("stream interrupted after it started: %s", failure.message)
            if streaming:
                await send({"type": "http.response.body", "more_body": True,
                            "body": error_event(kind, failure).encode()})
        await send({"type": "http.response.body", "body": b""})


async def _until_gone(receive: Any, stream: Stream) -> None:
    """Close the request to vLLM when the client goes away (vLLM then aborts it)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.leave()


async def _read_body(receive: Any, limit: int) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            raise ProxyError(413, f"The request body is larger than {limit} bytes "
                                  "(LOCAL_MAX_BODY_MB).")
        if not message.get("more_body"):
            return bytes(body)


def _log(scope: Scope, status: int, started: float) -> None:
    log.info("%s %s %d %.3f s", scope["method"], scope["path"][:200], status,
             time.perf_counter() - started)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))  # noqa: S104 (Runpod's balancer reaches the worker here)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _start(service: Service) -> None:
    """vLLM's start-up, while the server already answers /ping with 204."""
    if service.start_or_exit():
        service.supervise()
        log.info("Ready: /ping answers 200")


def serve(service: Service) -> None:
    """Serve the load-balancing endpoint until told to stop (the serve context exits)."""
    settings = service.settings
    assert settings.port is not None
    app = LoadBalanced(service)
    service.in_flight = lambda: app.in_flight
    ports = sorted({settings.port, settings.port_health or settings.port})
    sockets = [_listen(port) for port in ports]
    log.info("Listening on 0.0.0.0:%s (/ping on %s)", settings.port, settings.port_health)
    service.handle_signals()
    threading.Thread(target=_start, args=(service,), name="vllm-start", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        Server(config(app, backlog=2048)).run(sockets=sockets)
