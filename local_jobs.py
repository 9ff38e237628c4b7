"""The local endpoint's job table: Runpod's job lifecycle, run through the handler.

Each job runs through the handler exactly as the Runpod SDK runs it (a yielded
`{"error": ...}` fails the job; other yields are the output list), at most
`MAX_CONCURRENCY` at once, the rest queued, and is shown as Runpod's /status
shows it. Every operation costs the same however many jobs are kept: counts are
kept as jobs change, and finished jobs are forgotten oldest first.

Retention, as Runpod keeps results: 30 minutes after a job ends (/runsync: 1
minute), and at most `KEEP_JOBS` jobs and `KEEP_BYTES` of output, whichever
comes first; a finished job keeps its output, never its input. A job of the
OpenAI path is not kept at all: its answer goes to the one client that asked,
item by item through `follow`, and never into the table's output list.
Deliberate difference from Runpod: nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from errors import error_body

log = logging.getLogger("worker.local")
Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]
KEEP_SECONDS = {"/runsync": 60.0}
DEFAULT_KEEP_SECONDS = 1800.0
KEEP_JOBS = 10_000
KEEP_BYTES = 256 << 20
STATUSES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED")


class Job:
    """One job: its state as /status shows it, and a condition to wait on changes."""

    def __init__(self, job_id: str, job_input: Any, route: str, kept: bool) -> None:
        self.id = job_id
        self.route = route
        self.kept = kept  # shown by /status and /stream (not an OpenAI-path job)
        self.input: Any = job_input  # dropped once the job runs
        self.status = "IN_QUEUE"
        self.items: list[Any] = []
        self.error: str | None = None
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_item: float | None = None
        self.finished: float | None = None
        self.size = 0  # bytes of output, counted once the job ends
        self.task: asyncio.Task[None] | None = None
        self.feed: asyncio.Queue[Any] | None = None if kept else asyncio.Queue()
        self._streamed = 0
        self._changed = asyncio.Condition()

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
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except TimeoutError:
                return False
        return True

    async def changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def take_new(self) -> list[Any]:
        """The items that arrived since the last take (what one /stream poll returns)."""
        new = self.items[self._streamed:]
        self._streamed += len(new)
        return new

    def has_new(self) -> bool:
        return len(self.items) > self._streamed


class Jobs:
    """Runs jobs through the handler as the Runpod SDK would, MAX_CONCURRENCY at a time."""

    def __init__(self, run: Handler, max_concurrency: int, keep_jobs: int = KEEP_JOBS,
                 keep_bytes: int = KEEP_BYTES, keep_seconds: dict[str, float] | None = None,
                 ) -> None:
        self._keep_seconds = KEEP_SECONDS if keep_seconds is None else keep_seconds
        self._run = run
        self._slots = asyncio.Semaphore(max_concurrency)
        self._jobs: dict[str, Job] = {}
        self._live: dict[str, Job] = {}  # queued or running
        self._kept: OrderedDict[str, Job] = OrderedDict()  # finished, oldest first
        self._expiring: dict[float, deque[Job]] = {}  # keep time -> finished, oldest first
        self._kept_bytes = 0
        self._keep_jobs, self._keep_bytes = keep_jobs, keep_bytes
        self._counts = dict.fromkeys(STATUSES, 0)

    def submit(self, job_input: Any, route: str) -> Job:
        self._forget_expired()
        job = Job(f"local-{uuid.uuid4()}", job_input, route, not route.startswith("/openai"))
        self._live[job.id] = job
        if job.kept:
            self._jobs[job.id] = job
        self._counts["IN_QUEUE"] += 1
        job.task = asyncio.create_task(self._execute(job))
        return job

    def get(self, job_id: str) -> Job | None:
        self._forget_expired()
        return self._jobs.get(job_id)

    def unfinished(self) -> int:
        return len(self._live)

    def counts(self) -> dict[str, int]:
        """Runpod's /health job counts."""
        return {"completed": self._counts["COMPLETED"], "failed": self._counts["FAILED"],
                "cancelled": self._counts["CANCELLED"], "inProgress": self._counts["IN_PROGRESS"],
                "inQueue": self._counts["IN_QUEUE"], "retried": 0}

    async def cancel(self, job: Job) -> None:
        """Cancel a queued or running job and wait until it has ended."""
        if job.task is not None and not job.done:
            job.task.cancel()
            await job.wait(lambda: job.done)

    def cancel_queued(self) -> int:
        """Cancel every job still waiting for a slot; how many."""
        queued = [job for job in self._live.values() if job.status == "IN_QUEUE"]
        for job in queued:
            self.drop(job)
        return len(queued)

    def drop(self, job: Job) -> None:
        """Cancel a job without waiting (its client went away)."""
        if job.task is not None and not job.done:
            job.task.cancel()

    def cancel_all(self) -> None:
        for job in list(self._live.values()):
            self.drop(job)

    def _move(self, job: Job, status: str) -> None:
        self._counts[job.status] -= 1
        self._counts[status] += 1
        job.status = status

    async def _execute(self, job: Job) -> None:
        try:
            async with self._slots:
                job.started = time.monotonic()
                self._move(job, "IN_PROGRESS")
                job_input, job.input = job.input, None
                async with contextlib.aclosing(self._run({"id": job.id, "input": job_input})
                                               ) as out:
                    async for item in out:
                        if isinstance(item, dict) and item.get("error"):
                            job.error = str(item["error"])
                            self._move(job, "FAILED")
                            break
                        job.first_item = job.first_item or time.monotonic()
                        if job.feed is not None:
                            job.feed.put_nowait(item)
                        else:
                            job.items.append(item)
                            await job.changed()
            if job.status == "IN_PROGRESS":
                self._move(job, "COMPLETED")
        except asyncio.CancelledError:
            self._move(job, "CANCELLED")
        except Exception:  # the SDK turns this into a FAILED job too; never show the traceback
            log.exception("job %s: the handler raised", job.id)
            job.error = json.dumps(error_body(500, "The handler failed; see the worker's log."))
            self._move(job, "FAILED")
        finally:
            job.input = None
            job.finished = time.monotonic()
            del self._live[job.id]
            if job.feed is not None:
                job.feed.put_nowait(_END)
            if job.kept:
                self._keep(job)
            first = f"{job.first_item - job.created:.3f} s" if job.first_item else "-"
            log.info("job %s %s %s: first byte %s, total %.3f s", job.id, job.route, job.status,
                     first, job.finished - job.created)
            await job.changed()

    def _keep(self, job: Job) -> None:
        job.size = sum(len(i) if isinstance(i, str) else len(json.dumps(i)) for i in job.items)
        self._kept[job.id] = job
        self._kept_bytes += job.size
        keep = self._keep_seconds.get(job.route, DEFAULT_KEEP_SECONDS)
        self._expiring.setdefault(keep, deque()).append(job)
        while self._kept and (len(self._kept) > self._keep_jobs
                              or self._kept_bytes > self._keep_bytes):
            self._forget(next(iter(self._kept.values())))

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for keep, finished in self._expiring.items():
            while finished and (finished[0].id not in self._kept
                                or now - (finished[0].finished or now) >= keep):
                self._forget(finished.popleft())

    def _forget(self, job: Job) -> None:
        if self._kept.pop(job.id, None) is not None:
            self._kept_bytes -= job.size
            self._jobs.pop(job.id, None)


_END = object()  # the last item of a job's feed


async def follow(job: Job) -> AsyncIterator[Any]:
    """An OpenAI-path job's items as they come, then (if it failed) its error text."""
    assert job.feed is not None, "only OpenAI-path jobs have a feed"
    while (item := await job.feed.get()) is not _END:
        yield item
