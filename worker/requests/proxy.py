"""Send a job's vLLM request and relay the answer: the I/O half of the job contract.

What `Proxy.run(job_input)` yields, as the Runpod SDK expects from a generator:
- non-streaming: vLLM's JSON body, once;
- streaming: strings of whole SSE events exactly as vLLM sent them (event_reader.py),
  paced for the platform's stream posts (relay.py), or as they come for a consumer that
  takes no time (`Pacing.direct`: then an empty string first, as soon as vLLM's answer
  is known to be a stream, so that its head can go out before the first event);
- a failure before any output: one `{"error": "<OpenAI error JSON>"}`, which
  ends the job FAILED (errors.py); a failure after a stream started: an in-band
  error event in the stream's format, as vLLM itself does.
Nothing raises out of `run`; no traceback reaches a client. Closing the
generator (cancel, client gone) closes the vLLM connection, which makes vLLM
abort the generation. What a job asks for, and the shape of the answer, are
decided in contract.py; the serve context (serve/context.py) tells the proxy when to
refuse new jobs (`refuse`) and when to end the streams still open (`close_streams`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

import httpx

from worker.requests.contract import UpstreamRequest, requested_model, resolve, shape_answer
from worker.requests.errors import ProxyError, from_upstream
from worker.requests.event_reader import EventReader
from worker.requests.pool import make_client, request_body
from worker.requests.relay import Pacing, StreamRelay
from worker.requests.sse import StreamKind, error_event
from worker.upstream.target import Target

log = logging.getLogger("worker.proxy")


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class ModelLoader(Protocol):
    async def ensure(self, model: object) -> None: ...


def _no_exit(timeout: float) -> str | None:
    return None


class Proxy:
    """The worker's link to vLLM: one shared connection pool for every job."""

    def __init__(self, targets: Target | Sequence[Target], request_timeout: float = 600,
                 pacing: Pacing | None = None, prompt_max_tokens: int = 512,
                 upstream_exit: Callable[[float], str | None] = _no_exit,
                 api_key: str | None = None, max_connections: int = 256) -> None:
        self.targets = [targets] if isinstance(targets, Target) else list(targets)
        self.request_timeout = request_timeout
        self.pacing = pacing or Pacing()
        self.prompt_max_tokens = prompt_max_tokens
        self.upstream_exit = upstream_exit
        self.api_key = api_key  # vLLM's own --api-key, when the deployment gave one
        self.max_connections = max_connections  # what the worker can have in flight
        self.loader: ModelLoader | None = None  # loads on-demand LoRA adapters
        self.in_flight = 0  # jobs in `run` now
        self._refusal: str | None = None
        self._closing: str | None = None
        self._streams: set[Interruptible] = set()
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @property
    def refusal(self) -> str | None:
        """Why new jobs are refused (None while they are taken)."""
        return self._refusal

    def refuse(self, reason: str) -> None:
        """Answer every job from now on with a 503 that gives `reason`."""
        self._refusal = reason

    def close_streams(self, reason: str) -> None:
        """End every stream open now or opened later with an in-band 503 error giving
        `reason`, after the whole events already received (safe from any thread)."""
        self._closing = reason
        loop = self._client_loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
            loop.call_soon_threadsafe(self._interrupt_streams)

    def _interrupt_streams(self) -> None:
        for relay in list(self._streams):
            relay.interrupt()

    @property
    def closing(self) -> str | None:
        """Why the streams are being ended (None while they may run)."""
        return self._closing

    @contextlib.contextmanager
    def tracking(self, stream: Interruptible) -> Iterator[None]:
        """Count `stream` among the open ones `close_streams` ends."""
        self._streams.add(stream)
        if self._closing is not None:
            stream.interrupt()
        try:
            yield
        finally:
            self._streams.discard(stream)

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared pool, made in the running loop on first use (asyncio pools are loop-bound)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = make_client(self.request_timeout, self.api_key, self.max_connections)
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run(self, job_input: object, job_id: str = "-", pacing: Pacing | None = None
                  ) -> AsyncIterator[Any]:
        """Yield the job's output items (module docstring), paced by `pacing` (the proxy's
        own by default; a job's batch knobs apply over it); never raises."""
        started = time.perf_counter()
        outcome = "ok"
        failure: ProxyError | None = None
        self.in_flight += 1
        try:
            if self._refusal:
                raise ProxyError(503, self._refusal)
            if self.loader is not None:
                await self.loader.ensure(requested_model(job_input))
            job = resolve(job_input, self.targets, self.prompt_max_tokens, pacing or self.pacing)
            log.info("job %s: %s %s (%s)", job_id, job.first.method, job.first.path,
                     ", ".join(r.target.name for r in job.requests))
            if len(job.requests) == 1:
                async for item in self._exchange(job.first, job.pacing):
                    yield item if isinstance(item, str) else shape_answer([item], job.answer)
            else:
                bodies = [body for request in job.requests
                          async for body in self._exchange(request, job.pacing)]
                yield shape_answer(bodies, job.answer)
        except ProxyError as exc:
            failure = exc
            outcome = f"failed {exc.status}: {exc.message[:300]}"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception:  # a bug here must still end the job with an error, not a traceback
            log.exception("job %s: unexpected failure", job_id)
            failure = ProxyError(500, "The worker failed unexpectedly; see the worker's log.")
            outcome = "failed 500"
        finally:
            self.in_flight -= 1
            log.info("job %s: %s after %.3f s", job_id, outcome, time.perf_counter() - started)
        if failure is not None:
            yield failure.job_output()

    async def _exchange(self, request: UpstreamRequest, pacing: Pacing) -> AsyncIterator[Any]:
        """Send the request; raise ProxyError for anything that fails before output started."""
        content = None
        if request.body is not None:
            try:
                content = json.dumps(request.body, ensure_ascii=False, allow_nan=False).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                raise ProxyError(400, f"The request body cannot be sent as JSON: {exc}.") from None
        response = await self.open(request, content)
        try:
            if response.status_code >= 400:
                raise from_upstream(response.status_code, await self._read(response))
            if "text/event-stream" in response.headers.get("content-type", ""):
                async for text in self._relay(response, request.kind, pacing):
                    yield text
                return
            body = await self._read(response)
            try:
                parsed = json.loads(body)
            except ValueError:
                raise ProxyError(502, f"vLLM answered {request.path} with a body that is not "
                                      f"JSON: {body[:200]!r}") from None
            yield parsed
        finally:
            await response.aclose()

    async def open(self, request: UpstreamRequest, content: bytes | None, query: bytes = b""
                   ) -> httpx.Response:
        """Send `request` with `content` as its body; the response, its body still to read
        (close it). ProxyError when vLLM cannot be reached."""
        url = request.target.base_url + request.path + (f"?{query.decode()}" if query else "")
        body, headers = request_body(content) if content is not None else (None, {})
        if content is not None:
            headers["Content-Type"] = "application/json"
        message = self.client.build_request(request.method, url, content=body, headers=headers)
        try:
            return await self.client.send(message, stream=True)
        except httpx.HTTPError as exc:
            raise await self.transport_error(exc) from None

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise await self.transport_error(exc) from None

    async def _relay(self, response: httpx.Response, kind: StreamKind, pacing: Pacing
                     ) -> AsyncIterator[str]:
        started = pacing.direct
        async with EventReader(response, self) as events:
            if pacing.direct:
                yield ""  # a stream, for certain: its head may go out now
                async for chunk in events:
                    yield chunk.decode("utf-8", errors="replace")
            else:
                async for text in StreamRelay(events, pacing, kind):
                    started = True
                    yield text
        if events.failure is None:
            return
        if not started:
            raise events.failure
        log.warning("stream interrupted after it started: %s", events.failure.message)
        yield error_event(kind, events.failure)

    async def transport_error(self, exc: BaseException) -> ProxyError:
        """What went wrong talking to vLLM, checking first whether vLLM itself has gone."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return ProxyError(504, f"vLLM sent nothing for {self.request_timeout:g} s "
                                   "(REQUEST_TIMEOUT); the request was abandoned.")
        exit_reason = await asyncio.to_thread(self.upstream_exit, 1.0)
        if exit_reason:
            return ProxyError(503, f"vLLM is not running ({exit_reason}); the worker is "
                                   "restarting.")
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ProxyError(503, f"vLLM is not reachable: {exc}")
        detail = str(exc) or type(exc).__name__
        return ProxyError(502, f"The connection to vLLM broke: {detail}")
