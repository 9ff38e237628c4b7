"""Scenario 3, stream posts and latency: what a slow platform post does to a stream.

The handler runs as the SDK drives it (paths.InProcess) with a post that takes
`post_delay` (20 ms) per yielded item. The stand-in stamps every token with the
monotonic time it was written (`bench_stamp`), so each yielded item tells how long
each of its events waited. Per stream:

- yields: how many items (= stream posts) the job made;
- first yield: from the upstream writing its first event to the first yield;
- held: for every token, from the upstream writing it to the yield that carried it;
  the largest is reported, to compare with `post_delay + flush interval`;
- yield bound: the stream's duration at the upstream (first to last token) divided
  by the flush interval, plus two: the most yields relay.py promises.

- first token: from the upstream writing token 0 to the yield that carried it (the
  first yield may hold only the role chunk);
- for reference, the same first-event delay for a bare socket client reading the
  same kind of stream straight from the upstream: what the machine itself adds
  (process wake-ups on a shared virtual machine take milliseconds now and then).

Each kind of stream runs alone, `repeats` times one after the other (so what is
measured is the relay, not streams queueing for the CPU); the worst run is reported.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from benchmarks.measure import Background, ms
from benchmarks.paths import InProcess, chat
from benchmarks.processes import SERVED

STAMP = re.compile(r'"delta":\{"content":"(\d+\.\d+)"')


@dataclass
class Outcome:
    yields: int
    first_yield: float
    first_token: float
    held: float
    duration: float


async def one_stream(worker: InProcess, tokens: int, interval: float,
                     post_delay: float) -> Outcome:
    seen: list[tuple[float, str]] = []

    async def post(output: dict[str, Any]) -> None:
        seen.append((time.monotonic(), output["output"]))
        await asyncio.sleep(post_delay)

    body = chat(tokens, stream=True, bench_stamp=True, bench_token_interval=interval)
    await worker.job(body, post)
    stamps: list[tuple[float, float]] = []  # (written, yielded)
    for yielded_at, text in seen:
        stamps += [(float(stamp), yielded_at) for stamp in STAMP.findall(text)]
    if len(stamps) != tokens:
        raise RuntimeError(f"expected {tokens} stamped tokens, got {len(stamps)}")
    first_written = stamps[0][0]
    return Outcome(yields=len(seen), first_yield=seen[0][0] - first_written,
                   first_token=stamps[0][1] - first_written,
                   held=max(yielded - written for written, yielded in stamps),
                   duration=stamps[-1][0] - first_written)


async def bare_first_event(upstream_url: str, tokens: int, interval: float) -> float:
    """From the upstream writing token 0 to a bare socket client reading it."""
    where = urlsplit(upstream_url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    body = json.dumps({"model": SERVED, **chat(tokens, stream=True, bench_stamp=True,
                                                   bench_token_interval=interval)}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Length: %d"
                 b"\r\n\r\n%s" % (where.netloc.encode(), len(body), body))
    data, delay = b"", None
    while not data.endswith(b"\r\n0\r\n\r\n"):
        piece = await reader.read(1 << 16)
        if not piece:
            raise RuntimeError("the stand-in closed a stream early")
        data = data[-300:] + piece
        if delay is None and (found := STAMP.search(data.decode("utf-8", "replace"))):
            delay = time.monotonic() - float(found.group(1))
    writer.close()
    await writer.wait_closed()
    assert delay is not None
    return delay


async def scenario(upstream_url: str, worker: InProcess, kinds: list[tuple[str, int, float]],
                   repeats: int, post_delay: float) -> dict[str, Any]:
    """`kinds`: (label, tokens, seconds between tokens; 0 = as fast as the upstream can)."""
    interval = worker.flush_interval
    await one_stream(worker, 20, 0, post_delay)  # warm-up
    rows: list[dict[str, Any]] = []
    for label, tokens, token_interval in kinds:
        background = Background().start()
        runs = [await one_stream(worker, tokens, token_interval, post_delay)
                for _ in range(repeats)]
        bare = [await bare_first_event(upstream_url, tokens, token_interval)
                for _ in range(repeats)]
        closest = max(runs, key=lambda o: o.yields - bound(o.duration, interval))
        rows.append({
            "stream": label, "tokens": tokens, "runs": repeats,
            "duration_s": round(closest.duration, 3),
            "yields": closest.yields,
            "yield_bound": bound(closest.duration, interval),
            "yields_within_bound": all(o.yields <= bound(o.duration, interval) for o in runs),
            "first_yield_ms_max": ms(max(o.first_yield for o in runs)),
            "bare_client_first_event_ms_max": ms(max(bare)),
            "first_token_ms_max": ms(max(o.first_token for o in runs)),
            "held_ms_max": ms(max(o.held for o in runs)),
            "held_limit_ms": ms(post_delay + interval),
            "background_cores": background.cores(),
        })
    return {"post_delay_ms": ms(post_delay), "flush_interval_ms": ms(interval), "rows": rows}


def bound(duration: float, interval: float) -> int:
    """relay.py's promise: at most duration / interval + 2 yields."""
    return int(duration / interval) + 2 if interval > 0 else 1 << 30
