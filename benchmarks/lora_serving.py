"""Scenario 10, LoRA adapters on the real vLLM: loading one on demand, serving several.

One worker, the load-balancing server (`python handler.py` with `PORT`) starting vLLM's
CPU build on the tiny model, with `ADAPTERS` adapters named at start (`LORA_MODULES`,
`MAX_LORAS` as many, so a batch can hold them all) and `ON_DEMAND` more in a `LORA_DIR`,
all built by tools/tiny_adapter.py (rank 8 on q_proj and v_proj, random weights). Measured:

- first request to an on-demand adapter (the worker checks the folder and has vLLM load
  it, then answers) beside the next request to it and a request to the base model, one
  16-token chat completion each, for every on-demand adapter in turn;
- `vllm bench serve` through the server (random prompts, as scenario 8, `concurrency` in
  flight) to the base model alone and to the static adapters in rotation (its
  `--lora-modules`: each request names one at random), rounds alternating: output
  tokens/s and TTFT of each, and their ratio.

Nothing is pinned. The quick mode runs the worker on the stand-in vLLM (fakes/vllm.py,
which serves adapters and loads them as vLLM does): it proves the path, in seconds.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_serve import INPUT, OUTPUT, common_args, drive, summary
from benchmarks.cold_start import worker_env
from benchmarks.measure import ms
from benchmarks.processes import Process
from fakes.vllm import free_port, write_launcher
from tools.tiny_adapter import build

ADAPTERS = 4
ON_DEMAND = 3
BASE = "(a) base model alone"
ROTATION = f"(b) {ADAPTERS} adapters in rotation"


def timed(base: str, model: str) -> float:
    started = time.perf_counter()
    answer = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 16, "ignore_eos": True, "temperature": 0})
    answer.raise_for_status()
    return time.perf_counter() - started


async def scenario(work: Path, prompts: int, cycles: int, warmup: int, concurrency: int,
                   stand_in: bool) -> dict[str, Any]:
    return await asyncio.to_thread(measure, work, prompts, cycles, warmup, concurrency,
                                   stand_in)


def measure(work: Path, prompts: int, cycles: int, warmup: int, concurrency: int,
            stand_in: bool) -> dict[str, Any]:
    static = [build(work / "loras" / f"style-{i}", seed=i) for i in range(ADAPTERS)]
    folder = work / "lora-dir"
    for i in range(ON_DEMAND):
        build(folder / f"customer-{i}", seed=100 + i)
    modules = [{"name": path.name, "path": str(path)} for path in static]
    port = free_port()
    env = worker_env(work / "lora-volume", port, write_launcher(work) if stand_in else None,
                     LORA_MODULES=json.dumps(modules), LORA_DIR=str(folder),
                     MAX_LORAS=str(ADAPTERS))
    process = Process([sys.executable, "handler.py"], work / "lora-worker.log", env)
    base = f"http://127.0.0.1:{port}"
    process.start()
    try:
        process.wait_http(f"{base}/ping", 900)
        loads = []
        for i in range(ON_DEMAND):
            name = f"customer-{i}"
            loads.append({"adapter": name, "first_ms": ms(timed(base, name)),
                          "next_ms": ms(timed(base, name)),
                          "base_ms": ms(timed(base, "tiny-chat"))})
        # The prompts are aligned to vLLM's own tokenizer; the stand-in has none to ask.
        vllm_url = None if stand_in else f"http://127.0.0.1:{env['VLLM_PORT']}"
        paths = [(BASE, []), (ROTATION, ["--lora-modules", *(p.name for p in static)])]
        rounds = [{"name": name, "base_url": base, "pid": process.pid, "seed": 1000,
                   "prompts": warmup, "warmup": True, "args": args} for name, args in paths]
        for cycle in range(cycles):
            for name, args in paths[cycle % 2:] + paths[:cycle % 2]:
                rounds.append({"name": name, "base_url": base, "pid": process.pid,
                               "seed": cycle, "prompts": prompts, "warmup": False,
                               "args": args})
        spec = {"vllm_url": vllm_url, "common": common_args("tiny-chat", concurrency),
                "rounds": rounds}
        measured = [r for r in drive(work, spec, None, 1800) if not r["warmup"]]
    finally:
        process.stop(60)
    failed = [r for r in measured if r["failed"]]
    if failed:
        raise RuntimeError(f"requests failed in round {failed[0]['name']}: {failed[0]['errors']}")
    base = [r for r in measured if r["name"] == BASE]
    rows = [summary(BASE, base, None),
            summary(ROTATION, [r for r in measured if r["name"] == ROTATION], base)]
    load_rows = [{"request": label, "p50_ms": statistics.median(r[key] for r in loads),
                  "max_ms": max(r[key] for r in loads)}
                 for label, key in (("first to an on-demand adapter (loads it)", "first_ms"),
                                    ("the next to that adapter", "next_ms"),
                                    ("the base model", "base_ms"))]
    return {"adapters": ADAPTERS, "on_demand": ON_DEMAND, "prompts_per_round": prompts,
            "stand_in": stand_in, "input_tokens": INPUT, "output_tokens": OUTPUT,
            "cycles": cycles, "concurrency": concurrency, "load_rows": load_rows,
            "loads": loads, "rows": rows}
