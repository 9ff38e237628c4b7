"""The local endpoint's job table: Runpod's job lifecycle, run through the handler.

Each job runs through the handler exactly as the Runpod SDK runs it (a yielded
`{"error": ...}` fails the job; other yields are the output list), at most
`MAX_CONCURRENCY` at once, the rest queued, and is shown as Runpod's /status
shows it. Every operation costs the same however many jobs are kept: counts are
kept as jobs change, and finished jobs are forgotten oldest first.

Retention, as Runpod keeps results: 30 minutes after a job ends (/runsync: 1
minute), and at most `KEEP_JOBS` jobs and `KEEP_BYTES` of output, whichever
comes first; a finished job keeps its output, never its input. A job of the
OpenAI path is not kept at all: it runs in the task of the one client that asked
(`open`, then `follow`), its items go straight to that client, never into the
table's output list.
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

from worker.requests.errors import error_body

log = logging.getLogger("worker.local")
Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]
KEEP_SECONDS = {"/runsync": 60.0}
DEFAULT_KEEP_SECONDS = 1800.0
KEEP_JOBS = 10_000
KEEP_BYTES = 256 << 20
STATUSES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED")


class Job:
    """One job: its state as /status shows it, and what `wait` waits on for changes."""

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
        self.task: asyncio.Task[Any] | None = None
        self.dropped = False  # cancelled by the table (/purge-queue), not by its client
        self._streamed = 0
        self._change = asyncio.Event()

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
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    await self._change.wait()
        except TimeoutError:
            return False
        return True

    def notify(self) -> None:
        """Wake every `wait` to check again: the job changed."""
        self._change.set()
        self._change = asyncio.Event()

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
        """A job of the Runpod API (/run, /runsync), run in a task of its own and kept."""
        job = self._open(job_input, route, kept=True)
        job.task = asyncio.create_task(self._execute(job))
        return job

    def open(self, job_input: Any, route: str) -> Job:
        """A job of the OpenAI path: counted as any other, never kept, run by `follow` in
        its one client's task, so nothing stands between the handler and the answer."""
        return self._open(job_input, route, kept=False)

    def _open(self, job_input: Any, route: str, kept: bool) -> Job:
        self._forget_expired()
        job = Job(f"local-{uuid.uuid4()}", job_input, route, kept)
        self._live[job.id] = job
        if kept:
            self._jobs[job.id] = job
        self._counts["IN_QUEUE"] += 1
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
        """Cancel a job without waiting (/purge-queue)."""
        if job.task is not None and not job.done:
            job.dropped = True
            job.task.cancel()

    def _move(self, job: Job, status: str) -> None:
        self._counts[job.status] -= 1
        self._counts[status] += 1
        job.status = status

    async def _execute(self, job: Job) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async with contextlib.aclosing(self.follow(job)) as items:
                async for item in items:
                    job.items.append(item)
                    job.notify()

    async def follow(self, job: Job, run: Handler | None = None) -> AsyncIterator[Any]:
        """Run `job` in the caller's task once a slot is free, as the SDK runs a handler
        (`run`, else the table's): its output items as they come. A yielded `{"error": ...}`
        fails the job and ends it; so does an exception (never shown); leaving early or a
        cancel cancels it."""
        job.task = job.task or asyncio.current_task()
        try:
            async with self._slots:
                job.started = time.monotonic()
                self._move(job, "IN_PROGRESS")
                job_input, job.input = job.input, None
                handler = run or self._run
                async with contextlib.aclosing(handler({"id": job.id, "input": job_input})
                                               ) as out:
                    async for item in out:
                        if isinstance(item, dict) and item.get("error"):
                            job.error = str(item["error"])
                            self._move(job, "FAILED")
                            break
                        job.first_item = job.first_item or time.monotonic()
                        yield item
            if job.status == "IN_PROGRESS":
                self._move(job, "COMPLETED")
        except (asyncio.CancelledError, GeneratorExit):
            self._move(job, "CANCELLED")
            raise
        except Exception:  # the SDK turns this into a FAILED job too; never show the traceback
            log.exception("job %s: the handler raised", job.id)
            job.error = json.dumps(error_body(500, "The handler failed; see the worker's log."))
            self._move(job, "FAILED")
        finally:
            self._finish(job)

    def close(self, job: Job) -> None:
        """End a job `follow` never ran (its client left first) as cancelled."""
        if job.status == "IN_QUEUE" and job.task is None:
            self._move(job, "CANCELLED")
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.input = None
        job.finished = time.monotonic()
        del self._live[job.id]
        if job.kept:
            self._keep(job)
        first = f"{job.first_item - job.created:.3f} s" if job.first_item else "-"
        log.info("job %s %s %s: first byte %s, total %.3f s", job.id, job.route, job.status,
                 first, job.finished - job.created)
        job.notify()

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
