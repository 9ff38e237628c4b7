"""Turn one job into one vLLM request and relay the answer.

What `Proxy.run(job_input)` yields, as the Runpod SDK expects from a generator:
- non-streaming: vLLM's JSON body, once;
- streaming: strings of whole SSE events exactly as vLLM sent them (see relay.py);
- a failure before any output: one `{"error": "<OpenAI error JSON>"}`, which
  ends the job FAILED (errors.py); a failure after a stream started: an in-band
  error event in the stream's format, as vLLM itself does.
Nothing raises out of `run`; no traceback reaches a client. Closing the
generator (cancel, client gone) closes the vLLM connection, which makes vLLM
abort the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from errors import ProxyError, from_upstream, stream_error_event
from relay import Pacing, StreamRelay
from routes import Target, UpstreamRequest, resolve

log = logging.getLogger("worker.proxy")


def _no_exit(timeout: float) -> str | None:
    return None


def reshape(body: Any, how: str | None) -> Any:
    """vLLM's answer in the shape the job asked for: the embedding workers' rerank shape
    (results in document order, `document` as plain text only with return_docs)."""
    if how is None or not isinstance(body, dict) or not isinstance(body.get("results"), list):
        return body
    results = []
    for result in sorted(body["results"], key=lambda r: r.get("index", 0)):
        shaped = {"relevance_score": result.get("relevance_score"), "index": result.get("index")}
        if how == "rerank-docs":
            document = result.get("document")
            shaped["document"] = document.get("text") if isinstance(document, dict) else document
        results.append(shaped)
    tokens = (body.get("usage") or {}).get("total_tokens", 0)
    return {"model": body.get("model"), "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def pacing_for(job_input: object, default: Pacing) -> Pacing:
    """The job's own worker-vllm batch knobs, when it sets them, over the worker's defaults."""
    if not isinstance(job_input, dict):
        return default
    values: dict[str, Any] = {}
    for field, attr in (("min_batch_size", "min_batch_size"), ("max_batch_size", "max_batch_size"),
                        ("batch_size_growth_factor", "growth_factor")):
        value = job_input.get(field)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if attr == "growth_factor" and number and 1 <= value < 1e6:
            values[attr] = float(value)
        elif attr != "growth_factor" and number and 1 <= value < 1e9 and value == int(value):
            values[attr] = int(value)
        else:
            rule = "a number from 1" if attr == "growth_factor" else "a whole number from 1"
            raise ProxyError(400, f"{field} must be {rule}; got {json.dumps(value)[:50]}.", field)
    if not values:
        return default
    return Pacing(default.flush_interval, values.get("min_batch_size", default.min_batch_size),
                  values.get("max_batch_size", default.max_batch_size),
                  values.get("growth_factor", default.growth_factor))


class Proxy:
    """The worker's link to vLLM: one shared connection pool for every job."""

    def __init__(self, targets: Target | Sequence[Target], request_timeout: float = 600,
                 pacing: Pacing | None = None, prompt_max_tokens: int = 512,
                 upstream_exit: Callable[[float], str | None] = _no_exit) -> None:
        self.targets = [targets] if isinstance(targets, Target) else list(targets)
        self.request_timeout = request_timeout
        self.pacing = pacing or Pacing()
        self.prompt_max_tokens = prompt_max_tokens
        self.upstream_exit = upstream_exit
        self.refusal: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared pool, made in the running loop on first use (asyncio pools are loop-bound)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.request_timeout, connect=10),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                headers={"Accept-Encoding": "identity"},
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def run(self, job_input: object, job_id: str = "-") -> AsyncIterator[Any]:
        """Yield the job's output items (module docstring); never raises."""
        started = time.perf_counter()
        outcome = "ok"
        failure: ProxyError | None = None
        try:
            if self.refusal:
                raise ProxyError(503, self.refusal)
            request = resolve(job_input, self.targets, self.prompt_max_tokens)
            pacing = pacing_for(job_input, self.pacing)
            log.info("job %s: %s %s (%s)", job_id, request.method, request.path,
                     request.target.name)
            if request.path == "/v1/models" and len(self.targets) > 1:
                yield await self._all_models()
            else:
                async for item in self._exchange(request, pacing):
                    yield reshape(item, request.reshape)
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
        message = self.client.build_request(
            request.method, request.target.base_url + request.path, content=content,
            headers={"Content-Type": "application/json"} if content is not None else None)
        try:
            response = await self.client.send(message, stream=True)
        except httpx.HTTPError as exc:
            raise await self._transport_error(exc) from None
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

    async def _all_models(self) -> dict[str, Any]:
        """/v1/models of every vLLM server, as one list."""
        listed: list[Any] = []
        for target in self.targets:
            request = UpstreamRequest("GET", "/v1/models", None, "openai", target)
            async for body in self._exchange(request, self.pacing):
                listed += body.get("data", []) if isinstance(body, dict) else []
        return {"object": "list", "data": listed}

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise await self._transport_error(exc) from None

    async def _relay(self, response: httpx.Response, kind: str, pacing: Pacing
                     ) -> AsyncIterator[str]:
        relay = StreamRelay(response.aiter_bytes(), pacing)
        started = False
        async for text in relay:
            started = True
            yield text
        if relay.error is not None:
            error = await self._transport_error(relay.error)
        elif relay.leftover.strip():
            error = ProxyError(502, f"vLLM's stream ended in the middle of an event "
                                    f"({len(relay.leftover)} bytes cut off).")
        else:
            return
        if not started:
            raise error
        log.warning("stream interrupted after it started: %s", error.message)
        yield stream_error_event(kind, error)

    async def _transport_error(self, exc: BaseException) -> ProxyError:
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
