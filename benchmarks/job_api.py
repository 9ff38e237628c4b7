"""A stand-in for Runpod's job API, for the worker run as deployments run it (`python handler.py`).

It serves, in this process's event loop, the routes the Runpod SDK calls (URL templates
as `env()` gives them): job-take (a short long-poll: queued jobs at once, else 204 after
`poll` seconds), job-take-batch, job-stop (204), ping, job-stream and job-done (200).
It records when the first job-take arrived, counts stream posts per job, and wakes
`wait_done` as jobs finish. aiohttp is the SDK's own HTTP library, so it is always here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp import web

from benchmarks.processes import free_port

WORKER_ID = "bench-worker"
PREFIX = "/v2/bench"


class JobApi:
    def __init__(self, poll: float = 0.5) -> None:
        self.poll = poll
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.first_take: float | None = None
        self.stream_posts: dict[str, int] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self._finished = asyncio.Condition()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get(f"{PREFIX}/job-take/{{worker}}", self._take)
        app.router.add_get(f"{PREFIX}/job-take-batch/{{worker}}", self._take)
        app.router.add_get(f"{PREFIX}/job-stop/{{worker}}", self._nothing)
        app.router.add_get(f"{PREFIX}/ping/{{worker}}", self._ok)
        app.router.add_post(f"{PREFIX}/job-stream/{{worker}}/{{job}}", self._stream)
        app.router.add_post(f"{PREFIX}/job-done/{{worker}}/{{job}}", self._done)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def env(self) -> dict[str, str]:
        """The variables the platform gives a worker."""
        base = f"http://127.0.0.1:{self.port}{PREFIX}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_PING_INTERVAL": "10000",
            "RUNPOD_POD_ID": WORKER_ID,
            "RUNPOD_AI_API_KEY": "bench-platform-key",
        }

    def submit(self, job_input: Any) -> str:
        job_id = f"job-{next(self._ids)}"
        self.queue.put_nowait({"id": job_id, "input": job_input})
        return job_id

    async def wait_done(self, job_ids: list[str], timeout: float) -> None:
        async with self._finished:
            await asyncio.wait_for(
                self._finished.wait_for(lambda: all(j in self.done for j in job_ids)), timeout)

    async def _take(self, request: web.Request) -> web.Response:
        if self.first_take is None:
            self.first_take = time.monotonic()
        wanted = int(request.query.get("batch_size", "1"))
        try:
            jobs = [await asyncio.wait_for(self.queue.get(), self.poll)]
        except TimeoutError:
            return web.Response(status=204)
        while len(jobs) < wanted and not self.queue.empty():
            jobs.append(self.queue.get_nowait())
        if "job-take-batch" in request.path:
            return web.json_response(jobs)
        return web.json_response(jobs[0])

    async def _nothing(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _stream(self, request: web.Request) -> web.Response:
        await request.read()
        job = request.match_info["job"]
        self.stream_posts[job] = self.stream_posts.get(job, 0) + 1
        return web.Response(text="ok")

    async def _done(self, request: web.Request) -> web.Response:
        self.done[request.match_info["job"]] = json.loads(await request.text())
        async with self._finished:
            self._finished.notify_all()
        return web.Response(text="ok")
