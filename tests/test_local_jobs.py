"""The local endpoint's job table, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

from local_jobs import Jobs


def test_jobs_run_the_handler_the_way_the_sdk_does() -> None:
    """An `error` yield fails the job even after output; other yields are the output list."""

    async def scripted(job: dict[str, Any]) -> Any:
        yield "a"
        yield {"error": "boom"}
        yield "never"

    async def scenario() -> tuple[str, list[Any], str | None]:
        jobs = Jobs(scripted, 1)
        job = jobs.submit({}, "/run")
        await job.wait(lambda: job.done)
        return job.status, job.items, job.error

    assert asyncio.run(scenario()) == ("FAILED", ["a"], "boom")
