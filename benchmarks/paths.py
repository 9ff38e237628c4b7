"""The three ways a request reaches the upstream, side by side.

(a) `direct`: an httpx client talking to the upstream itself, its pool set up as the
    worker's own (proxy.py), so that the difference from (b) is the worker's code.
(b) `InProcess`: the job handler in this process, driven as the Runpod SDK
    drives it: the SDK's own `run_job_generator`, then its `handle_job` loop (an error
    item ends the job; every other item is kept for the aggregate and posted, one
    awaited post per item, serialised as the SDK does). The post itself is a sleep
    of `post_delay` (0: one turn of the event loop). The handler builds its proxy from
    the environment, as in a deployment; its log is written at INFO, to /dev/null.
    The SDK's own logger is set to WARN (at INFO it prints a line per job, which
    would only fill this terminal).
(c) `endpoint`: an httpx client talking to the local endpoint's `/openai/v1`, which
    runs in its own process (`processes.local_endpoint`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from handler import make_handler
from worker.serve.context import make_proxy
from worker.settings.loader import load
from worker.upstream.supervisor import Upstream
from worker.upstream.target import Target

CHAT_PATH = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


def chat(tokens: int, stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": HELLO, "max_tokens": tokens, **extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def client(base_url: str) -> httpx.AsyncClient:
    """One pool, configured like the worker's (proxy.py)."""
    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600, connect=10),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=256),
                             headers={"Accept-Encoding": "identity"})


class EventCounter:
    """Counts SSE events (blank-line terminated) in text arriving in arbitrary pieces."""

    def __init__(self) -> None:
        self.events = 0
        self._pending_newline = False

    def feed(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if not raw:
            return
        self.events += raw.count(b"\n\n") + (self._pending_newline and raw[:1] == b"\n")
        self._pending_newline = raw.endswith(b"\n") and not raw.endswith(b"\n\n")


class HttpPath:
    """A path that is an HTTP client: (a) direct or (c) through the local endpoint."""

    def __init__(self, base_url: str, route: str, model: str | None) -> None:
        self.http = client(base_url)
        self.route = route
        self.model = model

    def _body(self, body: dict[str, Any]) -> bytes:
        full = {"model": self.model, **body} if self.model else body
        return json.dumps(full).encode()

    async def complete(self, body: dict[str, Any]) -> Any:
        answer = await self.http.post(self.route, content=self._body(body),
                                      headers={"Content-Type": "application/json"})
        answer.raise_for_status()
        return answer.json()

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        request = self.http.build_request("POST", self.route, content=self._body(body),
                                          headers={"Content-Type": "application/json"})
        answer = await self.http.send(request, stream=True)
        try:
            answer.raise_for_status()
            async for piece in answer.aiter_bytes():
                yield piece
        finally:
            await answer.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()


def direct(upstream_url: str, model: str) -> HttpPath:
    """(a): the upstream's own chat route; the client names the model, as the worker does."""
    return HttpPath(upstream_url, CHAT_PATH, model)


def endpoint(endpoint_base: str, api_key: str | None = None) -> HttpPath:
    """(c): the local endpoint's OpenAI route; the worker fills in the model."""
    path = HttpPath(endpoint_base, f"/openai{CHAT_PATH}", None)
    if api_key:
        path.http.headers["Authorization"] = f"Bearer {api_key}"
    return path


Post = Callable[[dict[str, Any]], Awaitable[None]]


def quiet_sdk_logger() -> None:
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level("WARN")


def worker_logging() -> None:
    """The worker's INFO logging, as masking.setup_logging sets it, into /dev/null."""
    sink = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (lives as long as we do)
    sink.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [sink]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)


class InProcess:
    """(b): the job handler, made as the worker makes it from a deployment's environment
    (here to a vLLM that runs already, VLLM_BASE_URL)."""

    def __init__(self, env: dict[str, str]) -> None:
        from runpod.serverless.modules.rp_job import run_job_generator

        quiet_sdk_logger()
        worker_logging()
        settings = load({**os.environ, **env})
        self.proxy = make_proxy(settings, [Upstream(Target(settings.served_model_name,
                                                           settings.upstream_url))])
        self.handler = make_handler(self.proxy)
        self.flush_interval = settings.stream_flush_interval
        self._generator = run_job_generator
        self._jobs = 0

    async def job(self, body: dict[str, Any], post: Post) -> list[Any]:
        """Run one hosted-OpenAI-shaped job; the items the platform would aggregate."""
        self._jobs += 1
        job = {"id": f"bench-{self._jobs}",
               "input": {"openai_route": CHAT_PATH, "openai_input": body}}
        kept: list[Any] = []
        async for output in self._generator(self.handler, job):
            if isinstance(output.get("output"), dict) and output["output"].get("error"):
                output = {"error": str(output["output"]["error"])}
            if output.get("error"):
                raise RuntimeError(f"the job failed: {output['error'][:300]}")
            kept.append(output["output"])
            await post(output)
        return kept

    async def aclose(self) -> None:
        await self.proxy.aclose()


def sdk_post(delay: float) -> Post:
    """The platform's stream POST as the job sees it: serialise, then `delay` seconds."""

    async def post(output: dict[str, Any]) -> None:
        json.dumps(output, ensure_ascii=False)
        await asyncio.sleep(delay)

    return post
