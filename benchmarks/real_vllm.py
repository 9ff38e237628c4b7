"""Scenario 5, real vLLM on CPU: the tiny model, straight and through the local endpoint.

The local endpoint is started as `make run` starts it (it spawns vLLM's CPU build on
the tiny model), unless the URLs of a running one are given (`reuse`). A second
endpoint, in front of the same vLLM (`VLLM_BASE_URL`) with `STREAM_FLUSH_INTERVAL=0`,
shows what the coalescing interval costs. The same streamed chat completions (fixed
prompts, 32 tokens each, `ignore_eos`, temperature 0) go to vLLM directly and to each
endpoint's `/openai/v1`, paths interleaved, after a warm-up at each concurrency.
Per request: time to first token (the first event that carries one, see `has_token`)
and total time (to the end of the stream). Reported: p50 and p99 of each, p50 as a ratio to
vLLM's, and how long the endpoint's process waited for a CPU per request
(/proc/<pid>/schedstat; not known for a reused endpoint): on a machine where vLLM's
CPU engine keeps the cores busy, that wait, not the worker's code, sets the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.measure import Background, ms, percentile, waited_for_cpu
from benchmarks.paths import HttpPath, direct, endpoint
from benchmarks.processes import PROJECT, Process, external_env, local_endpoint
from fakes.vllm import free_port

PROMPTS = ["Hello there", "Tell me a story about a cat", "What is the capital of France?",
           "Write a haiku about the sea", "Explain recursion briefly", "List three colours",
           "How do airplanes fly?", "Say something nice"]
TOKENS = 32


@dataclass
class Reused:
    """A local endpoint already running in front of a real vLLM (e.g. the test session's)."""

    endpoint_url: str
    vllm_url: str
    api_key: str | None


def endpoint_env(work: Path, vllm_port: int, api_key: str) -> dict[str, str]:
    """What `make run` gives the worker on a machine without a GPU."""
    return {
        "MODEL_PATH": os.environ.get("TINY_MODEL_PATH", str(PROJECT / ".models" / "tiny-chat")),
        "VLLM_PYTHON": os.environ.get("VLLM_PYTHON", str(PROJECT / ".venv-vllm" / "bin" /
                                                         "python")),
        "VLLM_PORT": str(vllm_port), "HF_HOME": str(work / "hf-home"), "HF_HUB_OFFLINE": "1",
        "GPU_MEMORY_UTILIZATION": "0.3", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_EXTRA_ARGS": "--no-enable-chunked-prefill",
        "VLLM_STARTUP_TIMEOUT": "600", "LOCAL_API_KEY": api_key,
    }


GENERATED = ("content", "reasoning_content", "reasoning", "tool_calls")


def has_token(events: bytes) -> bool:
    """Whether any of these complete SSE events carries a generated token.

    A token's event is any delta with generated output but no `role` (that is the
    opening chunk), even an empty one: the tiny random model's tokens are often bytes
    that the detokenizer holds back until they make a character, so waiting for
    visible text would time the model's gibberish, not the stream.
    """
    for event in events.split(b"\n\n"):
        data = event.partition(b"data: ")[2]
        if not data or data == b"[DONE]":
            continue
        choices = json.loads(data).get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        if "role" not in delta and any(field in delta for field in GENERATED):
            return True
    return False


async def timed(path: HttpPath, prompt: str) -> tuple[float, float]:
    """(time to first token, total time) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    pending = b""
    async for piece in path.stream(body):
        if first is None:
            pending += piece
            cut = pending.rfind(b"\n\n") + 2
            if cut >= 2:
                complete, pending = pending[:cut], pending[cut:]
                if has_token(complete):
                    first = time.perf_counter() - started
    total = time.perf_counter() - started
    if first is None:
        raise RuntimeError("a stream ended without any generated text")
    return first, total


async def lanes(path: HttpPath, requests: int, concurrency: int) -> list[tuple[float, float]]:
    """`requests` requests (the prompts in turn), `concurrency` at a time."""
    results: list[tuple[float, float]] = []
    prompts = iter([PROMPTS[i % len(PROMPTS)] for i in range(requests)])

    async def lane() -> None:
        for prompt in prompts:
            results.append(await timed(path, prompt))

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return results


Path_ = tuple[str, HttpPath, int | None]  # name, client, the worker's pid (None: direct)


async def measure(paths: list[Path_], concurrencies: list[int], requests: int,
                  rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for concurrency in concurrencies:
        for _name, path, _pid in paths:  # warm-up: as many connections as requests in flight
            await lanes(path, concurrency, concurrency)
        taken: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in paths}
        starved = {name: 0.0 for name, _, _ in paths}
        background = Background().start()
        for turn in range(rounds):
            order = paths if turn % 2 == 0 else paths[::-1]
            for name, path, pid in order:
                before = waited_for_cpu(pid) if pid else 0.0
                taken[name] += await lanes(path, max(1, requests // rounds), concurrency)
                starved[name] += waited_for_cpu(pid) - before if pid else 0.0
        cores = background.cores()
        direct_name = paths[0][0]
        base_first = percentile([t[0] for t in taken[direct_name]], 0.5)
        base_total = percentile([t[1] for t in taken[direct_name]], 0.5)
        for name, _path, pid in paths:
            firsts = [t[0] for t in taken[name]]
            totals = [t[1] for t in taken[name]]
            rows.append({
                "path": name, "concurrency": concurrency, "requests": len(taken[name]),
                "ttft_p50_ms": ms(percentile(firsts, 0.5)),
                "ttft_p99_ms": ms(percentile(firsts, 0.99)),
                "total_p50_ms": ms(percentile(totals, 0.5)),
                "total_p99_ms": ms(percentile(totals, 0.99)),
                "ttft_p50_ratio": round(percentile(firsts, 0.5) / base_first, 3),
                "total_p50_ratio": round(percentile(totals, 0.5) / base_total, 3),
                "worker_cpu_wait_ms_per_request":
                    ms(starved[name] / len(taken[name])) if pid else None,
                "background_cores": cores,
            })
    return rows


async def served_model(vllm_url: str) -> str:
    async with httpx.AsyncClient() as probe:
        listed = (await probe.get(f"{vllm_url}/v1/models")).json()
    return str(listed["data"][0]["id"])


async def scenario(work: Path, reuse: Reused | None, concurrencies: list[int], requests: int,
                   rounds: int) -> dict[str, Any]:
    started = time.monotonic()
    process: Process | None = None
    if reuse is None:
        key = "bench-" + os.urandom(8).hex()
        vllm_port = free_port()
        process, base = await asyncio.to_thread(
            local_endpoint, work, endpoint_env(work, vllm_port, key), "real-endpoint", 600)
        reuse = Reused(base, f"http://127.0.0.1:{vllm_port}", key)
    load_seconds = time.monotonic() - started
    model = await served_model(reuse.vllm_url)
    uncoalesced, base = await asyncio.to_thread(
        local_endpoint, work, external_env(reuse.vllm_url, MODEL_NAME=model,
                                           STREAM_FLUSH_INTERVAL="0"), "endpoint-interval-0")
    paths: list[Path_] = [
        ("vLLM directly", direct(reuse.vllm_url, model), None),
        ("local endpoint /openai/v1", endpoint(reuse.endpoint_url, reuse.api_key),
         process.pid if process is not None else None),
        ("same, STREAM_FLUSH_INTERVAL=0", endpoint(base), uncoalesced.pid)]
    try:
        rows = await measure(paths, concurrencies, requests, rounds)
    finally:
        for _name, path, _pid in paths:
            await path.aclose()
        await asyncio.to_thread(uncoalesced.stop)
        if process is not None:
            await asyncio.to_thread(process.stop, 60)
    return {"tokens": TOKENS, "started_here": process is not None,
            "start_seconds": round(load_seconds, 1) if process is not None else None,
            "vllm_command": vllm_command(process), "rows": rows}


def vllm_command(process: Process | None) -> str | None:
    """The vLLM command line the worker logged, when the endpoint was started here."""
    if process is None:
        return None
    for line in process.log.read_text(errors="replace").splitlines():
        if "Starting vLLM" in line:
            return line.split(": ", 2)[-1]
    return None
