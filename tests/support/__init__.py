"""Helpers the tests share: a proxy to the scriptable fake vLLM, a job run the way the
Runpod SDK runs it and its error, the README's examples, the local endpoint in a thread,
and the stand-in vLLM (fakes.vllm) as a process of its own."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from pytest_httpserver import HTTPServer
from werkzeug import Response

from fakes.vllm import free_port, shell_command
from handler import make_handler
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.serve import http_limits
from worker.serve.job_table import Jobs
from worker.serve.local_api import Endpoint
from worker.upstream.target import Target

T = TypeVar("T")

SERVED = "test-org/test-model"


def proxy_to(fake_vllm: HTTPServer, **options: Any) -> Proxy:
    """A proxy to the fake vLLM, serving SERVED; `options` as Proxy takes them."""
    return Proxy(Target(SERVED, fake_vllm.url_for("/").rstrip("/")), **options)


def run_job(proxy: Proxy, job_input: Any, deadline: float | None = None) -> list[Any]:
    """Drive `handler` the way the Runpod SDK does and return everything it yielded
    (failing if the job still runs after `deadline` seconds)."""

    async def drive() -> list[Any]:
        try:
            handler = make_handler(proxy)
            return [item async for item in handler({"id": "job-1", "input": job_input})]
        finally:
            await proxy.aclose()

    return asyncio.run(asyncio.wait_for(drive(), deadline))


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
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return {name: (language, code) for language, name, code in EXAMPLE.findall(text)}


# A load-balancing endpoint's URL, as the README's shell and Python examples spell it.
DEPLOYED_LB = ("https://$ENDPOINT_ID.api.runpod.ai", "https://{os.environ['ENDPOINT_ID']}.api.runpod.ai")


def run_readme_example(name: str, endpoint_url: str, api_key: str) -> str:
    """Run one README example against `endpoint_url` (a local endpoint's …/v2/local, or a
    load-balancing server's root); its standard output."""
    language, code = readme_examples()[name]
    local_base = endpoint_url.removesuffix("/local") + "/"
    code = code.replace(DEPLOYED, local_base)
    for deployed in DEPLOYED_LB:
        code = code.replace(deployed, endpoint_url)
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" \
        else [sys.executable, "-c", code]
    env = {**os.environ, "ENDPOINT_ID": "local", "RUNPOD_API_KEY": api_key,
           "RUNPOD_ENDPOINT_BASE_URL": local_base.rstrip("/")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


class LocalEndpoint:
    """The local endpoint (Jobs + Endpoint, as local_endpoint.py's `main` wires them) served
    by uvicorn with the worker's limits in a thread, in front of `proxy`; `url` is its
    /v2/<id> base, `loop` its loop."""

    def __init__(self, proxy: Proxy, max_concurrency: int = 4, api_key: str | None = None,
                 max_body: int = 20 << 20) -> None:
        self.proxy = proxy
        self.max_concurrency, self.api_key, self.max_body = max_concurrency, api_key, max_body
        self.jobs: Jobs | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v2/ep1"
        self.server = uvicorn.Server(http_limits.config(self._app, host="127.0.0.1",
                                                        port=self.port, backlog=4096,
                                                        interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        if self.jobs is None:  # made inside the server's loop
            self.loop = asyncio.get_running_loop()
            self.jobs = Jobs(make_handler(self.proxy), self.max_concurrency)
            self.asgi = Endpoint(self.jobs, self.api_key, self.max_body,
                                 direct=make_handler(self.proxy, Pacing(direct=True))).app
        await self.asgi(scope, receive, send)

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
        """Run a coroutine in the endpoint's loop (to look at its tasks) and return its result."""
        assert self.loop is not None, "no request served yet"
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def __enter__(self) -> LocalEndpoint:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the endpoint did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None:
            self.call(self.proxy.aclose)
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class StandIn:
    """The stand-in vLLM (fakes.vllm) as a process of its own (another core than the worker
    code's), serving SERVED, with `/stats` to count what it served."""

    url: str
    process: subprocess.Popen[str]
    lines: collections.deque[str]  # its latest output, drained so that it never blocks

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/stats/reset", timeout=10).raise_for_status()

    def wait_for(self, condition: Callable[[dict[str, int]], bool], seconds: float,
                 what: str) -> dict[str, int]:
        """Poll /stats until `condition` holds; fail naming `what` after `seconds`."""
        deadline = time.monotonic() + seconds
        while not condition(stats := self.stats()):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {seconds} s waiting for {what}: {stats}")
            time.sleep(0.01)
        return stats


STAND_IN_VERSION = "0.0.0+stand-in"


def stand_in_python(directory: Path) -> str:
    """A VLLM_PYTHON that runs the stand-in vLLM for `-m`, else Python with a fake `vllm`."""
    package = directory / "site" / "vllm"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"__version__ = {STAND_IN_VERSION!r}\n")
    python = shlex.quote(sys.executable)
    wrapper = directory / "vllm-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ]; then {shell_command()}; fi\n'
        f'PYTHONPATH={shlex.quote(str(package.parent))} exec {python} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)
