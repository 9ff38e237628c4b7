"""Helpers the tests share: run a job the way the Runpod SDK does, read its error."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
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


# The README's examples: ```<language> example=<name> blocks, run against a local endpoint
# with the deployed URL swapped for the local one, as the README says to do.
EXAMPLE = re.compile(r"^```(\w+) example=([\w-]+)\n(.*?)^```$", re.M | re.S)
DEPLOYED = "https://api.runpod.ai/v2/"


def readme_examples() -> dict[str, tuple[str, str]]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return {name: (language, code) for language, name, code in EXAMPLE.findall(text)}


def run_readme_example(name: str, endpoint_url: str, api_key: str) -> str:
    """Run one README example against `endpoint_url` (…/v2/local); its standard output."""
    language, code = readme_examples()[name]
    local_base = endpoint_url.removesuffix("/local") + "/"
    code = code.replace(DEPLOYED, local_base)
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" \
        else [sys.executable, "-c", code]
    env = {**os.environ, "ENDPOINT_ID": "local", "RUNPOD_API_KEY": api_key,
           "RUNPOD_ENDPOINT_BASE_URL": local_base.rstrip("/")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout
