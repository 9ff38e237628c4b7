"""The local endpoint's job table, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from worker.serve import job_table as local_jobs
from worker.serve.job_table import Jobs


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


async def echo(job: dict[str, Any]) -> Any:
    yield {"echo": job["input"]}


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_a_finished_job_keeps_its_output_but_not_its_input() -> None:
    async def scenario() -> tuple[Any, list[Any]]:
        jobs = Jobs(echo, 2)
        job = jobs.submit({"big": "x" * 1000}, "/run")
        await job.wait(lambda: job.done)
        return job.input, job.view()["output"]

    assert run(scenario) == (None, [{"echo": {"big": "x" * 1000}}])


def test_retention_is_bounded_in_count_and_bytes_oldest_first() -> None:
    async def scenario() -> tuple[list[bool], list[bool]]:
        by_count = Jobs(echo, 4, keep_jobs=3)
        jobs = [by_count.submit(i, "/run") for i in range(5)]
        for job in jobs:
            await job.wait(lambda job=job: job.done)
        by_bytes = Jobs(echo, 4, keep_bytes=100)
        large = [by_bytes.submit("y" * 40, "/run") for _ in range(4)]
        for job in large:
            await job.wait(lambda job=job: job.done)
        return ([by_count.get(j.id) is not None for j in jobs],
                [by_bytes.get(j.id) is not None for j in large])

    kept_by_count, kept_by_bytes = run(scenario)
    assert kept_by_count == [False, False, True, True, True]
    assert kept_by_bytes == [False, False, False, True]  # each output is 51 bytes of JSON


def test_retention_is_bounded_in_time() -> None:
    async def scenario() -> tuple[bool, bool]:
        jobs = Jobs(echo, 2, keep_seconds={"/runsync": 0.0})
        kept, gone = jobs.submit(1, "/run"), jobs.submit(2, "/runsync")
        for job in (kept, gone):
            await job.wait(lambda job=job: job.done)
        return jobs.get(kept.id) is not None, jobs.get(gone.id) is not None

    assert run(scenario) == (True, False)
    assert local_jobs.KEEP_SECONDS == {"/runsync": 60.0} and local_jobs.DEFAULT_KEEP_SECONDS == 1800


def test_openai_path_jobs_run_in_their_clients_task_and_are_never_kept() -> None:
    async def scenario() -> tuple[list[Any], bool, str, bool, dict[str, int]]:
        jobs = Jobs(echo, 2)
        job = jobs.open("hi", "/openai/v1/chat/completions")
        items = [item async for item in jobs.follow(job)]
        return (items, jobs.get(job.id) is None and job.items == [], job.status,
                job.task is asyncio.current_task(), jobs.counts())

    items, not_kept, status, in_own_task, counts = run(scenario)
    assert items == [{"echo": "hi"}] and not_kept and status == "COMPLETED" and in_own_task
    assert counts["completed"] == 1 and counts["inProgress"] == counts["inQueue"] == 0


def test_an_openai_path_job_left_early_or_never_run_is_cancelled_and_counted() -> None:
    async def two(job: dict[str, Any]) -> Any:
        yield "a"
        yield "b"

    async def scenario() -> tuple[str, str, dict[str, int], int]:
        jobs = Jobs(two, 2)
        left = jobs.open({}, "/openai/v1/chat/completions")
        async with contextlib.aclosing(jobs.follow(left)) as items:
            await anext(items)
        never = jobs.open({}, "/openai/v1/chat/completions")
        jobs.close(never)
        jobs.close(left)  # already ended: closing it again changes nothing
        return left.status, never.status, jobs.counts(), jobs.unfinished()

    left, never, counts, unfinished = run(scenario)
    assert (left, never, counts["cancelled"], unfinished) == ("CANCELLED", "CANCELLED", 2, 0)


class Counted(local_jobs.Job):
    """A job that counts every read of its status: the table's work, in operations."""

    reads = 0

    def __getattribute__(self, name: str) -> Any:
        if name == "status":
            Counted.reads += 1
        return super().__getattribute__(name)


def test_every_operation_costs_the_same_however_many_jobs_are_kept(monkeypatch: Any) -> None:
    """Counted, not timed: the reads of job states one round of operations makes."""
    monkeypatch.setattr(local_jobs, "Job", Counted)

    async def one_round(kept: int) -> int:
        jobs = Jobs(echo, 8)
        earlier = [jobs.submit(i, "/run") for i in range(kept)]
        for job in earlier:
            await job.wait(lambda job=job: job.done)
        Counted.reads = 0
        job = jobs.submit("new", "/run")
        await job.wait(lambda: job.done)
        jobs.counts()
        jobs.unfinished()
        jobs.get(earlier[0].id)
        jobs.cancel_queued()
        return Counted.reads

    assert run(lambda: one_round(10)) == run(lambda: one_round(2000))
