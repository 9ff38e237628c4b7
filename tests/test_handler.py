"""The job handler the Runpod SDK calls: detected as a generator, relaying the proxy."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from handler import make_handler
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.target import Target


class Recording(Proxy):
    """A proxy that records what it is asked to run and answers with two items."""

    def __init__(self) -> None:
        super().__init__(Target("m", "http://127.0.0.1:9"))
        self.runs: list[tuple[object, str]] = []
        self.pacings: list[Pacing | None] = []

    async def run(self, job_input: object, job_id: str = "-",  # type: ignore[override]
                  pacing: Pacing | None = None) -> Any:
        self.runs.append((job_input, job_id))
        self.pacings.append(pacing)
        yield "first"
        yield {"second": True}


def test_the_handler_is_an_async_generator_function_the_sdk_detects() -> None:
    assert inspect.isasyncgenfunction(make_handler(Recording()))


def test_the_handler_relays_the_jobs_input_and_id_and_every_item() -> None:
    proxy = Recording()
    handler = make_handler(proxy)

    async def drive(job: dict[str, Any]) -> list[Any]:
        return [item async for item in handler(job)]

    assert asyncio.run(drive({"id": "job-7", "input": {"prompt": "x"}})) == [
        "first", {"second": True}]
    asyncio.run(drive({}))
    assert proxy.runs == [({"prompt": "x"}, "job-7"), (None, "-")]


def test_a_handler_made_with_a_pacing_runs_every_job_with_it() -> None:
    proxy, direct = Recording(), Pacing(direct=True)

    async def drive() -> None:
        async for _ in make_handler(proxy, direct)({"id": "j", "input": {}}):
            pass
        async for _ in make_handler(proxy)({"id": "k", "input": {}}):
            pass

    asyncio.run(drive())
    assert proxy.pacings == [direct, None]
