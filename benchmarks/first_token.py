"""Scenario 7, first content token on the real vLLM: what the worker adds before the answer.

The same streamed chat completions (fixed prompts, `TOKENS` tokens, `ignore_eos`,
temperature 0) go, one at a time, to the real vLLM (the tiny model on vLLM's CPU build)
by six paths, interleaved: every round sends one request by each, in an order that
rotates from round to round, so each path is as often first as last:

(a) straight to vLLM with httpx (paths.direct);
(b) `make_handler(proxy)(job)` in this process, driven as the Runpod SDK drives it
    (paths.InProcess), with an instant consumer and with a 20 ms one (the platform's
    stream POST, paths.sdk_post(0.02));
(c) the local endpoint's `/openai/v1` (its own process, VLLM_BASE_URL to the same vLLM);
(d) the load-balancing server's `/v1` (`python handler.py` with PORT, the same way);
(e) for scale, the throwaway ten-line starlette + httpx proxy of scenario 8: what one
    HTTP hop through Python costs here, whoever relays.

Measured per request: from sending it to the first content token, i.e. the first SSE
event whose delta has non-empty `content` (not the role chunk, nor the empty-content
chunks vLLM sends while the detokenizer holds back a partial character). For (b) that is
the moment the SDK hands the yield carrying it to the post; for (a) and (c) the moment
the HTTP client reads it. For (a) the role chunk's time is kept too: how far vLLM itself
writes it ahead of the first content. Two regimes: back to back, and with vLLM idle
`idle` seconds before each request (its engine loop then wakes from a wait). Reported per
path: p50 and p90, and their difference to (a)'s p50 and p90 in the same regime.

When vLLM was started for this scenario it runs on core 0 and this process and the local
endpoint on core 1 (see processes.vllm_server and the notes on measuring a proxy on two
cores); a reused vLLM (`--real-vllm`) is taken as it is.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.measure import Background, ms, percentile
from benchmarks.paths import HttpPath, InProcess, direct, endpoint
from benchmarks.processes import external_env, lb_server, local_endpoint, reference_proxy
from benchmarks.real_vllm import PROMPTS

TOKENS = 16
POST_DELAY = 0.02
DIRECT = "(a) vLLM directly"
PATHS = (DIRECT, "(b) handler(job), instant consumer", "(b) handler(job), 20 ms consumer",
         "(c) local endpoint /openai/v1", "(d) load-balancing server /v1",
         "(e) reference: ten-line starlette + httpx proxy")


def body(prompt: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True}


def kinds(events: bytes) -> tuple[bool, bool]:
    """(any chat chunk with choices, any with non-empty delta content) in whole SSE events."""
    chunk = content = False
    for event in events.split(b"\n\n"):
        data = event.partition(b"data: ")[2]
        if not data or data == b"[DONE]":
            continue
        payload = json.loads(data)
        if "error" in payload:
            raise RuntimeError(f"error in the stream: {data[:300]!r}")
        choices = payload.get("choices") or []
        if choices:
            chunk = True
            content = content or bool((choices[0].get("delta") or {}).get("content"))
    return chunk, content


class Clock:
    """Reads a stream's pieces; when the first chat chunk and the first content came."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_chunk: float | None = None
        self.first_content: float | None = None
        self._pending = b""

    def feed(self, piece: bytes) -> None:
        if self.first_content is not None:
            return
        self._pending += piece
        cut = self._pending.rfind(b"\n\n") + 2
        if cut < 2:
            return
        complete, self._pending = self._pending[:cut], self._pending[cut:]
        chunk, content = kinds(complete)
        now = time.perf_counter() - self.started
        if chunk and self.first_chunk is None:
            self.first_chunk = now
        if content:
            self.first_content = now

    def result(self) -> tuple[float, float]:
        if self.first_content is None or self.first_chunk is None:
            raise RuntimeError(f"a stream of {TOKENS} tokens ended without any content")
        return self.first_content, self.first_chunk


async def over_http(path: HttpPath, prompt: str) -> tuple[float, float]:
    clock = Clock()
    async for piece in path.stream(body(prompt)):
        clock.feed(piece)
    return clock.result()


async def through_handler(worker: InProcess, prompt: str, delay: float) -> tuple[float, float]:
    clock = Clock()

    async def post(output: dict[str, Any]) -> None:
        if isinstance(output.get("output"), str):
            clock.feed(output["output"].encode())
        json.dumps(output, ensure_ascii=False)  # what the SDK's post does first
        await asyncio.sleep(delay)

    await worker.job(body(prompt), post)
    return clock.result()


Run = Callable[[str], Awaitable[tuple[float, float]]]


async def regime(runs: list[tuple[str, Run]], rounds: int, idle: float
                 ) -> dict[str, list[tuple[float, float]]]:
    taken: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
    for turn in range(rounds):
        shift = turn % len(runs)
        for name, run in runs[shift:] + runs[:shift]:
            if idle:
                await asyncio.sleep(idle)
            taken[name].append(await run(PROMPTS[turn % len(PROMPTS)]))
    return taken


def rows(label: str, idle: float, taken: dict[str, list[tuple[float, float]]], cores: float
         ) -> list[dict[str, Any]]:
    base = [t[0] for t in taken[DIRECT]]
    base50, base90 = percentile(base, 0.5), percentile(base, 0.9)
    found = []
    for name, samples in taken.items():
        firsts = [t[0] for t in samples]
        p50, p90 = percentile(firsts, 0.5), percentile(firsts, 0.9)
        found.append({
            "regime": label, "idle_before_s": idle, "path": name, "requests": len(samples),
            "p50_ms": ms(p50), "p90_ms": ms(p90),
            "p50_minus_direct_ms": ms(p50 - base50), "p90_minus_direct_ms": ms(p90 - base90),
            "role_chunk_p50_ms": ms(percentile([t[1] for t in samples], 0.5))
            if name == DIRECT else None,
            "background_cores": cores,
        })
    return found


async def scenario(work: Path, vllm_url: str, model: str, pinned: bool, rounds: int,
                   idle: float) -> dict[str, Any]:
    env = external_env(vllm_url, MODEL_NAME=model)
    core = 1 if pinned else None
    process, base = await asyncio.to_thread(local_endpoint, work, env, "first-token-endpoint",
                                            60, core)
    lb, lb_base = await asyncio.to_thread(lb_server, work, env, "first-token-lb", 60, core)
    ref, ref_base = await asyncio.to_thread(reference_proxy, work, vllm_url, core)
    worker = InProcess(env)
    straight, through = direct(vllm_url, model), endpoint(base)
    balanced, relayed = direct(lb_base, model), direct(ref_base, model)
    runs: list[tuple[str, Run]] = [
        (PATHS[0], lambda p: over_http(straight, p)),
        (PATHS[1], lambda p: through_handler(worker, p, 0.0)),
        (PATHS[2], lambda p: through_handler(worker, p, POST_DELAY)),
        (PATHS[3], lambda p: over_http(through, p)),
        (PATHS[4], lambda p: over_http(balanced, p)),
        (PATHS[5], lambda p: over_http(relayed, p))]
    found: list[dict[str, Any]] = []
    try:
        await regime(runs, 2 * len(runs), 0.0)  # warm-up: connections, the engine's caches
        for label, pause in (("back to back", 0.0), (f"vLLM idle {idle:g} s before each", idle)):
            background = Background().start()
            taken = await regime(runs, rounds, pause)
            found += rows(label, pause, taken, background.cores())
    finally:
        for client in (worker, straight, through, balanced, relayed):
            await client.aclose()
        for server in (process, lb, ref):
            await asyncio.to_thread(server.stop)
    return {"tokens": TOKENS, "post_delay_ms": POST_DELAY * 1000, "idle_s": idle,
            "rounds": rounds, "pinned": pinned, "model": model, "rows": found}
