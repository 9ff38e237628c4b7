"""Scenario 11, the relay's ceiling: how many tokens one worker process relays, flat out.

The stand-in vLLM (fakes.vllm) streams chat completions as fast as its core lets it, in
vLLM's chunk shape, one event per HTTP chunk and per socket write, as vLLM writes them.
`streams` streams stay open at once (each slot starts its next stream when one ends;
lengths drawn from `tokens`, the same for every path of a round), through ONE worker
process in each mode:

- (a) the queue path: `python handler.py` under the real Runpod SDK, its stream posts
  (and job-done posts) going to the fake platform (fakes.platform), which keeps it fed;
- (b) the local endpoint's OpenAI path: `python local_endpoint.py`, `/v2/<id>/openai/v1`;
- (c) the load-balancing server: `python handler.py` with PORT set, `/v1`;

and, interleaved with them in each round, the same streams read straight from the
stand-in: "direct". Pinning, as a GPU machine has it: the worker alone on core 1, so its
core is what runs out; the stand-in on core 0, and this process (the reading client, and
the platform for (a)) beside it on core 0, where its CPU takes nothing from the worker.
Each measurement starts its streams, lets them run `warmup` seconds, then counts for
`seconds`: events reaching the client, the worker's utime+stime (/proc/PID/stat) and the
gaps between each stream's events; then it stops starting streams, lets the open ones
end, and compares every stream, by the stand-in's digest of what it wrote, with what
the client received. A stream that failed, or differs by a byte, is counted (and
printed) rather than raised: the "every byte" target then fails, with the rest of the
figures kept; the quick-mode test fails on it. Reported per mode and stream count:
medians over `rounds` rounds (the paths' order rotating).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.measure import Background, cpu_seconds, ms, own_cpu_seconds, waited_for_cpu
from benchmarks.memory import wait_for_take
from benchmarks.paths import CHAT_PATH
from benchmarks.processes import (
    PROJECT,
    SERVED,
    Process,
    base_env,
    external_env,
    lb_server,
    local_endpoint,
    on_core,
    pin_threads,
    upstream,
)
from benchmarks.stream_load import HttpStreams, QueueStreams, Tally, lengths
from fakes.platform import Platform

DIRECT = "direct: read straight from the stand-in"
QUEUE = "(a) queue: handler.py under the Runpod SDK"
LOCAL = "(b) local endpoint /openai/v1"
BALANCED = "(c) load-balancing server /v1"
PATHS = (DIRECT, QUEUE, LOCAL, BALANCED)
STAND_IN_CORE, WORKER_CORE = 0, 1
CONCURRENCY = "2048"  # every worker takes more streams than are sent
DRAIN = 120.0  # seconds the open streams get to end once a measurement stops


@dataclass
class Measured:
    events: int
    seconds: float
    worker_cpu: float | None
    worker_waited: float | None  # runnable, waiting for a CPU (other load on its core)
    stand_in_cpu: float
    client_cpu: float
    tally: Tally
    bytes_sent: int
    bytes_lost: int
    mismatched: int
    background: float


class Rig:
    """The stand-in, the three workers and the platform, for the whole scenario."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.feed: QueueStreams | None = None
        self.platform = Platform(ping_interval=10, keep_received=False,
                                 on_done=self._job_done)
        self.processes: list[Process] = []

    def _job_done(self, job_id: str) -> None:
        if self.feed is not None:
            self.feed.job_done(job_id)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Rig]:
        try:
            self.stand_in, self.url = await asyncio.to_thread(
                upstream, self.work, "ceiling-upstream", STAND_IN_CORE)
            self.processes.append(self.stand_in)
            self.platform.start()
            env = external_env(self.url, MAX_CONCURRENCY=CONCURRENCY)
            queue = Process(on_core([sys.executable, "handler.py"], WORKER_CORE),
                            self.work / "ceiling-queue.log", base_env(**env, **self.platform.env()))
            queue.start()
            self.processes.append(queue)
            (local, self.local_base), (balanced, self.lb_base) = await asyncio.gather(
                asyncio.to_thread(local_endpoint, self.work, env, "ceiling-endpoint", 60,
                                  WORKER_CORE),
                asyncio.to_thread(lb_server, self.work, env, "ceiling-lb", 60, WORKER_CORE))
            self.processes += [local, balanced]
            await wait_for_take(self.platform, queue, 60)
            self.pids = {QUEUE: queue.pid, LOCAL: local.pid, BALANCED: balanced.pid}
            yield self
        finally:
            for process in self.processes:
                await asyncio.to_thread(process.stop)
            await asyncio.to_thread(self.platform.stop)

    def load(self, path: str, streams: int, seed: int, tokens: tuple[int, int]
             ) -> HttpStreams | QueueStreams:
        sizes = lengths(seed, *tokens)
        if path == QUEUE:
            return QueueStreams(streams, sizes, *tokens)
        url, route, model = {
            DIRECT: (self.url, CHAT_PATH, SERVED),
            LOCAL: (self.local_base, f"{urlsplit(self.local_base).path}/openai{CHAT_PATH}",
                    None),
            BALANCED: (self.lb_base, CHAT_PATH, SERVED)}[path]
        return HttpStreams(url, route, model, streams, sizes, *tokens)

    async def digests(self) -> dict[str, list[Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.get(f"{self.url}/digests")
        answer.raise_for_status()
        found: dict[str, list[Any]] = answer.json()
        return found

    async def measure(self, path: str, streams: int, seed: int, tokens: tuple[int, int],
                      warmup: float, seconds: float) -> Measured:
        load = self.load(path, streams, seed, tokens)
        pid = self.pids.get(path)
        background = Background().start()
        if isinstance(load, QueueStreams):
            self.feed = load
            load.start(self.platform)
        else:
            await load.start()
        await asyncio.sleep(warmup)  # a timer: the window starts once the streams run
        load.tally.start = start = time.monotonic()
        cpu0 = cpu_seconds(pid) if pid else 0.0
        wait0 = waited_for_cpu(pid) if pid else 0.0
        stand0, own0 = cpu_seconds(self.stand_in.pid), own_cpu_seconds()
        await asyncio.sleep(seconds)
        load.tally.end = end = time.monotonic()
        worker = cpu_seconds(pid) - cpu0 if pid else None
        waited = waited_for_cpu(pid) - wait0 if pid else None
        stand_in = cpu_seconds(self.stand_in.pid) - stand0
        client = own_cpu_seconds() - own0
        await load.stop(DRAIN)
        self.feed = None
        others = background.cores()
        tally = load.tally
        sent, lost, mismatched = compare(await self.digests(), tally)
        if tally.errors or lost or mismatched:
            print(f"  LOST: {path}, {streams} streams: {len(tally.errors)} stream(s) failed "
                  f"{tally.errors[:3]}, {lost} bytes lost, {mismatched} stream(s) not "
                  "byte-identical to what the stand-in sent", file=sys.stderr, flush=True)
        return Measured(tally.events, end - start, worker, waited, stand_in, client, tally, sent,
                        lost, mismatched, others)


def compare(digests: dict[str, list[Any]], tally: Tally) -> tuple[int, int, int]:
    """(bytes the stand-in sent, bytes not delivered byte-identical, streams differing or
    missing on either side): a stream that differs at all counts as lost whole."""
    sent = lost = mismatched = 0
    for name, (size, sha, completed) in digests.items():
        sent += size
        if not completed or tally.received.get(name) != (size, sha):
            lost += size
            mismatched += 1
    mismatched += len(set(tally.received) - set(digests))
    return sent, lost, mismatched


def git_commit() -> str:
    """The commit of the tree measured (`git describe`-like, short), or "unknown"."""
    found = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, check=False)
    return found.stdout.strip() or "unknown"


def row(path: str, streams: int, runs: list[Measured], direct: list[Measured]
        ) -> dict[str, Any]:
    rates = [r.events / r.seconds for r in runs]
    relayed = path != DIRECT
    p99 = [r.tally.gap_quantile(0.99) for r in runs]
    gaps = [r.tally.gap_quantile(0.99, deliveries=True) for r in runs]
    return {
        "path": path, "streams": streams,
        "events": sum(r.events for r in runs),
        "events_per_s": round(statistics.median(rates)),
        "worker_cpu_us_per_event": round(statistics.median(
            r.worker_cpu / r.events * 1e6 for r in runs if r.worker_cpu is not None), 2)
        if relayed else None,
        "worker_core_busy": round(statistics.median(
            r.worker_cpu / r.seconds for r in runs if r.worker_cpu is not None), 2)
        if relayed else None,
        "worker_waited_for_cpu": round(statistics.median(
            r.worker_waited / r.seconds for r in runs if r.worker_waited is not None), 2)
        if relayed else None,
        "core0_busy": round(statistics.median(
            (r.stand_in_cpu + r.client_cpu) / r.seconds for r in runs), 2),
        "stand_in_cpu_us_per_event": round(statistics.median(
            r.stand_in_cpu / r.events * 1e6 for r in runs), 2),
        "events_per_piece": round(statistics.median(
            r.tally.events / max(1, r.tally.pieces) for r in runs), 1),
        "itl_p50_ms": ms(statistics.median(r.tally.gap_quantile(0.5) for r in runs)),
        "itl_p99_ms": ms(statistics.median(p99)),
        "itl_p99_minus_direct_ms": ms(statistics.median(
            mine - d.tally.gap_quantile(0.99) for mine, d in zip(p99, direct, strict=True)))
        if relayed else None,
        "delivery_gap_p99_ms": ms(statistics.median(gaps)),
        "delivery_gap_p99_minus_direct_ms": ms(statistics.median(
            mine - d.tally.gap_quantile(0.99, deliveries=True)
            for mine, d in zip(gaps, direct, strict=True))) if relayed else None,
        "bytes_sent": sum(r.bytes_sent for r in runs),
        "bytes_lost": sum(r.bytes_lost for r in runs),
        "streams_mismatched": sum(r.mismatched for r in runs),
        "streams_failed": sum(len(r.tally.errors) for r in runs),
        "failures": [e[:300] for r in runs for e in r.tally.errors][:5],
        "streams_checked": sum(len(r.tally.received) for r in runs),
        "rounds_events_per_s": [round(rate) for rate in rates],
        "background_cores": round(statistics.mean(r.background for r in runs), 2),
    }


async def scenario(work: Path, stream_counts: list[int], seconds: float, warmup: float,
                   rounds: int, tokens: tuple[int, int]) -> dict[str, Any]:
    before = pin_threads({STAND_IN_CORE})
    try:
        async with Rig(work).running() as rig:
            for path in PATHS:  # warm-up: imports, connections, the SDK's first jobs
                await rig.measure(path, 8, 0, (10, 50), 0.2, 0.5)
            rows: list[dict[str, Any]] = []
            for streams in stream_counts:
                runs: dict[str, list[Measured]] = {path: [] for path in PATHS}
                for turn in range(rounds):
                    order = PATHS[turn % len(PATHS):] + PATHS[:turn % len(PATHS)]
                    for path in order:
                        print(f"  relay ceiling: {path}, {streams} streams, round {turn + 1}",
                              file=sys.stderr, flush=True)
                        runs[path].append(await rig.measure(
                            path, streams, turn, tokens, warmup, seconds))
                rows += [row(path, streams, runs[path], runs[DIRECT]) for path in PATHS]
    finally:
        pin_threads(before)
    return {"commit": git_commit(), "seconds": seconds, "warmup_s": warmup, "rounds": rounds,
            "tokens_per_stream": list(tokens), "stand_in_core": STAND_IN_CORE,
            "worker_core": WORKER_CORE, "rows": rows}
