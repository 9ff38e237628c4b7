"""Scenario 9, cold start on the real vLLM: a worker's launch until it answers, three ways.

Each launch is what a new Runpod worker does: `python handler.py` as a load-balancing
server (`PORT` set, so `/ping` answers 204 while vLLM loads, 200 once it is healthy),
starting vLLM's CPU build on the tiny model. Per launch: seconds from the launch to
`/ping` 200, and to the first answer (a 16-token chat completion sent at once after);
the worker's start-up timeline line (compile cache hit or miss, engine init); then the
output tokens/s of `LOAD` streamed requests, `CONCURRENCY` at a time, so the cost of
skipping the compile shows beside what it saves. Three regimes, `launches` each, the
regimes interleaved launch by launch:

- cold compile cache: a new "volume" (its own `HF_HOME`, so an empty `vllm-cache` beside
  it) for each launch, as the first worker of an endpoint;
- warm compile cache: one volume whose cache an unmeasured launch filled first, as every
  later worker of that endpoint;
- `ENFORCE_EAGER=true`: no compile and no graph capture, on a new volume each time.

Nothing is pinned: a start-up uses both cores, as on a real worker's CPU side. The quick
mode launches the stand-in vLLM instead (fakes/vllm.py): it proves the path, in seconds.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.processes import Process, base_env, tiny_model, vllm_python
from fakes.vllm import free_port, write_launcher

REGIMES = ("cold compile cache", "warm compile cache", "ENFORCE_EAGER=true")
TOKENS = 64
CONCURRENCY = 8
TIMELINE = re.compile(r"Start-up of \S+: .*")


def worker_env(volume: Path, port: int, python: str | None = None, **extra: str
               ) -> dict[str, str]:
    """A worker as `make run-lb` starts one, its "network volume" at `volume`, its vLLM
    run by `python` (vLLM's own environment by default)."""
    return base_env(
        PORT=str(port), VLLM_PORT=str(free_port(2)), MODEL_PATH=str(tiny_model()),
        VLLM_PYTHON=python or vllm_python(), HF_HOME=str(volume / "huggingface"),
        HF_HUB_OFFLINE="1",
        GPU_MEMORY_UTILIZATION="0.3", VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="1", ENABLE_CHUNKED_PREFILL="false",
        VLLM_STARTUP_TIMEOUT="900", **extra)


async def load(base: str, requests: int) -> float:
    """Output tokens/s of `requests` streamed chat completions, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell a story"}],
            "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}

    async def one(client: httpx.AsyncClient) -> None:
        async with gate, client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for _ in r.aiter_raw():
                pass

    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(requests)))
        return round(requests * TOKENS / (time.perf_counter() - started), 1)


def launch(work: Path, volume: Path, name: str, requests: int, python: str | None,
           **extra: str) -> dict[str, Any]:
    port = free_port()
    process = Process([sys.executable, "handler.py"], work / f"{name}.log",
                      worker_env(volume, port, python, **extra))
    base = f"http://127.0.0.1:{port}"
    process.start()
    try:
        process.wait_http(f"{base}/ping", 900)
        healthy = time.monotonic() - process.launched
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 16})
        answer.raise_for_status()
        first = time.monotonic() - process.launched
        tokens_per_s = asyncio.run(load(base, requests)) if requests else None
    finally:
        process.stop(60)
    line = TIMELINE.search(process.log.read_text(errors="replace"))
    return {"healthy_s": round(healthy, 1), "first_answer_s": round(first, 1),
            "tokens_per_s": tokens_per_s, "timeline": line.group(0) if line else None}


async def scenario(work: Path, launches: int, requests: int,
                   regimes: tuple[str, ...] = REGIMES, stand_in: bool = False
                   ) -> dict[str, Any]:
    python = write_launcher(work) if stand_in else None
    return {**await asyncio.to_thread(measure, work, launches, requests, regimes, python),
            "stand_in": stand_in}


def measure(work: Path, launches: int, requests: int, regimes: tuple[str, ...],
            python: str | None) -> dict[str, Any]:
    warm = work / "volume-warm"
    if "warm compile cache" in regimes:
        launch(work, warm, "cold-start-prime", 0, python)
    runs: dict[str, list[dict[str, Any]]] = {regime: [] for regime in regimes}
    for number in range(launches):
        for index, regime in enumerate(regimes):
            volume = warm if regime == "warm compile cache" else work / f"volume-{number}-{index}"
            eager = {"ENFORCE_EAGER": "true"} if regime.startswith("ENFORCE") else {}
            runs[regime].append(launch(work, volume, f"cold-start-{number}-{index}", requests,
                                       python, **eager))
    rows = []
    for regime, done in runs.items():
        speeds = [r["tokens_per_s"] for r in done if r["tokens_per_s"] is not None]
        rows.append({
            "regime": regime, "launches": len(done),
            "healthy_s": statistics.median(r["healthy_s"] for r in done),
            "healthy_s_each": [r["healthy_s"] for r in done],
            "first_answer_s": statistics.median(r["first_answer_s"] for r in done),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "timeline": done[-1]["timeline"]})
    base = rows[0]
    for row in rows:
        row["healthy_minus_cold_s"] = round(row["healthy_s"] - base["healthy_s"], 1)
        if row["tokens_per_s"] and base["tokens_per_s"]:
            row["tokens_per_s_ratio"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
    return {"launches": launches, "requests": requests, "tokens": TOKENS,
            "concurrency": CONCURRENCY, "rows": rows}
