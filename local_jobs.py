"""The local endpoint's job table: Runpod's job lifecycle, run through the handler.

Each job runs through the handler exactly as the Runpod SDK runs it (a yielded
`{"error": ...}` fails the job; other yields are the output list), at most
`MAX_CONCURRENCY` at once, the rest queued; it is shown as Runpod's /status shows it.
Deliberate differences from Runpod: results stay for 30 minutes (/runsync: 1), and
nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from errors import error_body

log = logging.getLogger("worker.local")
Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]
KEEP_SECONDS = {"/runsync": 60.0}
DEFAULT_KEEP_SECONDS = 1800.0


@dataclass(eq=False)
class Job:
    id: str
    input: Any
    route: str
    status: str = "IN_QUEUE"
    items: list[Any] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_item: float | None = None
    finished: float | None = None
    streamed: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def done(self) -> bool:
        return self.finished is not None

    def view(self) -> dict[str, Any]:
        """The job as Runpod's /status shows it."""
        shown: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started is not None:
            shown["delayTime"] = round((self.started - self.created) * 1000)
        if self.finished is not None and self.started is not None:
            shown["executionTime"] = round((self.finished - self.started) * 1000)
        if self.status == "COMPLETED":
            shown["output"] = self.items
        if self.error is not None:
            shown["error"] = self.error
        return shown

    async def wait(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until `ready()` (re-checked whenever the job changes); False on timeout."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(ready), timeout)
            except TimeoutError:
                return False
        return True


class Jobs:
    """Runs jobs through the handler as the Runpod SDK would, MAX_CONCURRENCY at a time."""

    def __init__(self, run: Handler, max_concurrency: int) -> None:
        self.run = run
        self.slots = asyncio.Semaphore(max_concurrency)
        self.jobs: dict[str, Job] = {}
        self.finished = {"COMPLETED": 0, "FAILED": 0, "CANCELLED": 0}

    def submit(self, job_input: Any, route: str) -> Job:
        self._forget_old()
        job = Job(f"local-{uuid.uuid4()}", job_input, route)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._execute(job))
        return job

    def unfinished(self) -> int:
        return sum(not job.done for job in list(self.jobs.values()))

    def counts(self) -> dict[str, int]:
        jobs = list(self.jobs.values())
        return {"completed": self.finished["COMPLETED"], "failed": self.finished["FAILED"],
                "cancelled": self.finished["CANCELLED"],
                "inProgress": sum(j.status == "IN_PROGRESS" for j in jobs),
                "inQueue": sum(j.status == "IN_QUEUE" for j in jobs), "retried": 0}

    async def _execute(self, job: Job) -> None:
        try:
            async with self.slots:
                job.status, job.started = "IN_PROGRESS", time.monotonic()
                async with contextlib.aclosing(self.run({"id": job.id, "input": job.input})) as out:
                    async for item in out:
                        if isinstance(item, dict) and item.get("error"):
                            job.error, job.status = str(item["error"]), "FAILED"
                            break
                        job.items.append(item)
                        job.first_item = job.first_item or time.monotonic()
                        await notify(job)
            if job.status == "IN_PROGRESS":
                job.status = "COMPLETED"
        except asyncio.CancelledError:
            job.status = "CANCELLED"
        except Exception:  # the SDK turns this into a FAILED job too; never show the traceback
            log.exception("job %s: the handler raised", job.id)
            job.status = "FAILED"
            job.error = json.dumps(error_body(500, "The handler failed; see the worker's log."))
        finally:
            job.finished = time.monotonic()
            self.finished[job.status] = self.finished.get(job.status, 0) + 1
            first = f"{job.first_item - job.created:.3f} s" if job.first_item else "-"
            log.info("job %s %s %s: first byte %s, total %.3f s", job.id, job.route, job.status,
                     first, job.finished - job.created)
            await notify(job)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            keep = KEEP_SECONDS.get(job.route, DEFAULT_KEEP_SECONDS)
            if job.finished is not None and (job.route.startswith("/openai")
                                             or now - job.finished > keep):
                del self.jobs[job.id]


async def notify(job: Job) -> None:
    async with job.changed:
        job.changed.notify_all()
