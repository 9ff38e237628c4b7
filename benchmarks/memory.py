"""Scenario 6, the worker's memory, as deployments run it (`python handler.py`, no vLLM).

The worker runs under the real Runpod SDK against the job API stand-in (fakes.platform),
with `VLLM_BASE_URL` pointing at the stand-in vLLM (fakes.vllm), so nothing but the worker is
measured. Resident memory (VmRSS) of the worker's process is read once it has asked
for jobs and sat idle, then every 20 ms while it serves `streams` streaming jobs of
`tokens` chunks at once (all jobs queued before it takes them), and once more after.
The SDK's heartbeat process is reported apart. The same run gives, for reference,
the worker's CPU per 1,000 events and the stream posts per job under the real SDK,
with its logging at its default level.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Background, children_of, cpu_seconds, rss_mb
from benchmarks.paths import CHAT_PATH, EventCounter, chat
from benchmarks.processes import Process, base_env, external_env
from fakes.platform import Platform


async def wait_for_take(api: Platform, worker: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while api.first_take is None:
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.proc.returncode}):\n{worker.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker took no job within {timeout:g} s:\n{worker.tail()}")
        await asyncio.sleep(0.02)


async def sample_peak(pid: int, stop: asyncio.Event) -> float:
    peak = 0.0
    while not stop.is_set():
        peak = max(peak, rss_mb(pid))
        await asyncio.sleep(0.02)
    return peak


def helpers_rss(pid: int) -> float:
    return round(sum(rss_mb(child) for child in children_of(pid)), 1)


async def scenario(work: Path, upstream_url: str, streams: int, tokens: int,
                   settle: float) -> dict[str, Any]:
    api = Platform(ping_interval=10).start()
    env = base_env(**external_env(upstream_url, MAX_CONCURRENCY=str(max(streams, 30))),
                   **api.env())
    worker = Process([sys.executable, "handler.py"], work / "memory-worker.log", env)
    try:
        worker.start()
        await wait_for_take(api, worker, 60)
        await asyncio.sleep(settle)
        idle, idle_helpers = rss_mb(worker.pid), helpers_rss(worker.pid)
        background = Background().start()
        cpu0, started = cpu_seconds(worker.pid), time.perf_counter()
        ids = [api.queue_job({"openai_route": CHAT_PATH, "openai_input": chat(tokens, True)})
               for _ in range(streams)]
        stop = asyncio.Event()
        peak_task = asyncio.ensure_future(sample_peak(worker.pid, stop))
        await asyncio.to_thread(api.wait_done, ids, 300)
        seconds = time.perf_counter() - started
        used = cpu_seconds(worker.pid) - cpu0
        stop.set()
        peak = await peak_task
        loaded_helpers = helpers_rss(worker.pid)
        await asyncio.sleep(settle)
        after = rss_mb(worker.pid)
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(api.stop)
    events = 0
    for job_id in ids:
        counter = EventCounter()
        for text in api.results[job_id].get("output", []):
            counter.feed(text)
        if counter.events != tokens + 3:
            raise RuntimeError(f"job {job_id} carried {counter.events} events, not {tokens + 3}: "
                               f"{str(api.results[job_id])[:300]}")
        events += counter.events
    posts = [len(api.streams.get(job_id, [])) for job_id in ids]
    return {
        "streams": streams, "tokens_per_stream": tokens,
        "idle_rss_mb": idle, "peak_rss_mb": peak, "after_rss_mb": after,
        "sdk_heartbeat_rss_mb": {"idle": idle_helpers, "loaded": loaded_helpers},
        "load_seconds": round(seconds, 3), "events_per_s": round(events / seconds),
        "worker_cpu_s_per_1000_events": round(used / events * 1000, 4),
        "stream_posts_per_job": {"median": statistics.median(posts), "max": max(posts)},
        "background_cores": background.cores(),
    }
