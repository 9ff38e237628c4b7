"""Helpers the tests share: run a job the way the Runpod SDK does, read its error."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from werkzeug import Response

import handler
from proxy import Proxy

SERVED = "test-org/test-model"


def run_job(proxy: Proxy, job_input: Any) -> list[Any]:
    """Drive `handler` the way the Runpod SDK does and return everything it yielded."""

    async def drive() -> list[Any]:
        try:
            return [item async for item in handler.handler({"id": "job-1", "input": job_input})]
        finally:
            await proxy.aclose()

    return asyncio.run(drive())


def job_error(items: list[Any]) -> dict[str, Any]:
    """The OpenAI error object of a FAILED job (the last yield, an `error` dict)."""
    assert items, "the job yielded nothing"
    last = items[-1]
    assert isinstance(last, dict) and set(last) == {"error"}, last
    return json.loads(last["error"])["error"]


def sse(chunks: list[bytes], status: int = 200) -> Response:
    """A streamed SSE answer written chunk by chunk."""
    return Response(iter(chunks), status=status, content_type="text/event-stream")
