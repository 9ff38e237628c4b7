"""Scenario 1, request overhead: one small non-streaming chat completion, many times.

The same body through (a), (b) and (c) (paths.py), at each concurrency: `requests`
requests in `rounds` rounds, paths interleaved (so background noise falls on all
alike), after a warm-up. The first row is the stand-in's own ceiling, read with bare
keep-alive sockets. Latency is one request's wall time as its caller sees it:
for (b), from calling the handler to the job's last item. Reported: p50, p99, and
p50 as a difference from and a ratio to (a).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from benchmarks.measure import Background, ms, percentile
from benchmarks.paths import HttpPath, InProcess, chat, sdk_post
from benchmarks.processes import SERVED

Call = Callable[[], Awaitable[Any]]


class BareClient:
    """The stand-in's own ceiling: keep-alive sockets, one request each at a time, no parsing
    beyond the length of the answer."""

    def __init__(self, upstream_url: str, body: dict[str, Any]) -> None:
        where = urlsplit(upstream_url)
        self.host, self.port = where.hostname or "127.0.0.1", where.port or 80
        data = json.dumps({"model": SERVED, **body}).encode()
        self.request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (where.netloc.encode(), len(data), data))
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def complete(self) -> None:
        reader, writer = self.idle.pop() if self.idle else \
            await asyncio.open_connection(self.host, self.port)
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        self.idle.append((reader, writer))

    async def aclose(self) -> None:
        for _reader, writer in self.idle:
            writer.close()
        self.idle.clear()


async def latencies(call: Call, requests: int, concurrency: int) -> list[float]:
    """Wall time of each of `requests` calls, `concurrency` in flight at any moment."""
    taken: list[float] = []
    remaining = requests

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            taken.append(time.perf_counter() - started)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return taken


async def scenario(upstream_url: str, direct: HttpPath, worker: InProcess, endpoint: HttpPath,
                   concurrencies: list[int], requests: int, rounds: int) -> dict[str, Any]:
    body = chat(16, stream=False)
    post = sdk_post(0)
    bare = BareClient(upstream_url, body)

    async def through_handler() -> None:
        items = await worker.job(body, post)
        if len(items) != 1 or items[0].get("object") != "chat.completion":
            raise RuntimeError(f"unexpected job output: {str(items)[:200]}")

    paths: list[tuple[str, Call]] = [
        ("stand-in ceiling (bare socket client)", bare.complete),
        ("(a) direct httpx client", lambda: direct.complete(body)),
        ("(b) handler(job), SDK-driven", through_handler),
        ("(c) local endpoint /openai/v1", lambda: endpoint.complete(body)),
    ]
    rows: list[dict[str, Any]] = []
    for concurrency in concurrencies:
        for _name, call in paths:
            await latencies(call, max(50, concurrency * 2), concurrency)
        taken: dict[str, list[float]] = {name: [] for name, _ in paths}
        background = Background().start()
        elapsed = {name: 0.0 for name, _ in paths}
        for turn in range(rounds):
            order = paths if turn % 2 == 0 else paths[::-1]
            for name, call in order:
                begin = time.perf_counter()
                taken[name] += await latencies(call, requests // rounds, concurrency)
                elapsed[name] += time.perf_counter() - begin
        cores = background.cores()
        base = percentile(taken[paths[1][0]], 0.5)
        for name, _call in paths:
            p50 = percentile(taken[name], 0.5)
            compared = name.startswith("(")
            rows.append({
                "path": name, "concurrency": concurrency, "requests": len(taken[name]),
                "p50_ms": ms(p50), "p99_ms": ms(percentile(taken[name], 0.99)),
                "p50_minus_direct_ms": ms(p50 - base) if compared else None,
                "p50_ratio_to_direct": round(p50 / base, 3) if compared else None,
                "requests_per_s": round(len(taken[name]) / elapsed[name]),
                "background_cores": cores,
            })
    await bare.aclose()
    return {"tokens": 16, "rows": rows}
