"""Scenario 2, stream relay: many concurrent streams of vLLM-shaped chunks, sent flat out.

Each stream is a chat completion of `tokens` content chunks (plus the role chunk, the
usage chunk and `[DONE]`). Every stream's events are counted where they arrive and
must all be there. Reported per path: events per second (all streams' events over the
wall time from the first request to the last event) and the worker's CPU seconds per
1,000 events: this process's for (a) and (b), the endpoint process's for (c). The
first row is the stand-in's own ceiling, read by a bare socket client that only
counts bytes. Each configuration runs `rounds` times, paths interleaved (the order
reversed every other round); reported are medians over the rounds, the ratio to (a)
as the median of each round's ratio (runs next to each other share the machine's
state, so background load cancels out best there).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from benchmarks.measure import Background, cpu_seconds, own_cpu_seconds
from benchmarks.paths import EventCounter, HttpPath, InProcess, chat, sdk_post
from benchmarks.processes import SERVED

StreamOnce = Callable[[dict[str, Any]], Awaitable[int]]


@dataclass
class Run:
    events: int
    seconds: float
    cpu: float
    upstream_cpu: float
    background: float


async def raw_stream(upstream_url: str, body: dict[str, Any]) -> int:
    """The stand-in's ceiling: a socket, one request, count events until the last chunk."""
    where = urlsplit(upstream_url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    data = json.dumps({"model": SERVED, **body}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (where.netloc.encode(), len(data), data))
    counter = EventCounter()
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        piece = await reader.read(1 << 16)
        if not piece:
            raise RuntimeError("the stand-in closed a stream early")
        counter.feed(piece)
        tail = (tail + piece)[-16:]
    writer.close()
    await writer.wait_closed()
    return counter.events


def over_http(path: HttpPath) -> StreamOnce:
    async def once(body: dict[str, Any]) -> int:
        counter = EventCounter()
        async for piece in path.stream(body):
            counter.feed(piece)
        return counter.events
    return once


def through_handler(worker: InProcess) -> StreamOnce:
    async def once(body: dict[str, Any]) -> int:
        counter = EventCounter()
        for text in await worker.job(body, sdk_post(0)):
            counter.feed(text)
        return counter.events
    return once


async def measure(once: StreamOnce, streams: int, tokens: int, worker_pid: int | None,
                  upstream_pid: int) -> Run:
    """Run `streams` streams at once; CPU is `worker_pid`'s, or this process's when None."""
    body = chat(tokens, stream=True)

    def cpu() -> float:
        return own_cpu_seconds() if worker_pid is None else cpu_seconds(worker_pid)

    background = Background().start()
    cpu0, up0, started = cpu(), cpu_seconds(upstream_pid), time.perf_counter()
    counts = await asyncio.gather(*(once(body) for _ in range(streams)))
    seconds = time.perf_counter() - started
    used, upstream_used = cpu() - cpu0, cpu_seconds(upstream_pid) - up0
    expected = tokens + 3
    wrong = [c for c in counts if c != expected]
    if wrong:
        raise RuntimeError(f"{len(wrong)} stream(s) did not carry {expected} events: {wrong[:5]}")
    return Run(sum(counts), seconds, used, upstream_used, background.cores())


async def scenario(upstream_url: str, upstream_pid: int, worker: InProcess,
                   endpoint: HttpPath, endpoint_pid: int, direct: HttpPath,
                   stream_counts: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    paths: list[tuple[str, StreamOnce, int | None]] = [
        ("stand-in ceiling (bare socket client)",
         lambda body: raw_stream(upstream_url, body), None),
        ("(a) direct httpx client", over_http(direct), None),
        ("(b) handler(job), SDK-driven", through_handler(worker), None),
        ("(c) local endpoint /openai/v1", over_http(endpoint), endpoint_pid),
    ]
    for _name, once, pid in paths:  # warm-up: connections, imports, caches
        await measure(once, 4, 50, pid, upstream_pid)
    rows: list[dict[str, Any]] = []
    for streams in stream_counts:
        runs: dict[str, list[Run]] = {name: [] for name, _, _ in paths}
        for turn in range(rounds):
            order = paths if turn % 2 == 0 else paths[:1] + paths[:0:-1]
            for name, once, pid in order:
                runs[name].append(await measure(once, streams, tokens, pid, upstream_pid))
        baseline = runs[paths[1][0]]
        for name, _once, _pid in paths:
            mine = runs[name]
            rates = [r.events / r.seconds for r in mine]
            compared = name.startswith("(")
            rows.append({
                "path": name, "streams": streams, "events": mine[0].events,
                "events_per_s": round(statistics.median(rates)),
                "ratio_to_direct": round(statistics.median(
                    rate / (d.events / d.seconds) for rate, d in zip(rates, baseline, strict=True)
                ), 3) if compared else None,
                "worker_cpu_s_per_1000_events": round(statistics.median(
                    r.cpu / r.events * 1000 for r in mine), 4),
                "upstream_cpu_s_per_1000_events": round(statistics.median(
                    r.upstream_cpu / r.events * 1000 for r in mine), 4),
                "rounds_events_per_s": [round(rate) for rate in rates],
                "background_cores": round(statistics.mean(r.background for r in mine), 2),
            })
    return {"tokens_per_stream": tokens, "events_per_stream": tokens + 3,
            "flush_interval_s": worker.flush_interval, "rows": rows}
