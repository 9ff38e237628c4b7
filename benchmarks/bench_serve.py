"""Scenario 8, vLLM's own benchmark client (`vllm bench serve`) through the worker's servers.

vLLM's client (random dataset from the model's own tokenizer, `INPUT` input and `OUTPUT`
output tokens per request with `--ignore-eos`, temperature 0, `concurrency` requests in
flight, chat completions streamed) is sent to one real vLLM (the tiny model, CPU build)
by these paths, in rounds that alternate between them:

(a) straight to vLLM's `/v1`;
(c) the local endpoint's `/v2/<id>/openai/v1` (`python local_endpoint.py`);
(d) the load-balancing server's `/v1` (`python handler.py` with PORT and no job queue);
(e) for reference, a throwaway ten-line starlette + httpx proxy (reference_proxy.py);
(f) for reference, the floor of any relay: bytes spliced both ways, no HTTP at all
    (reference_splice.py).

Both worker processes have VLLM_BASE_URL to that vLLM and MAX_CONCURRENCY 512 (never a
429 here). (e) and (f) are not the worker: (e) shows what the least a Python HTTP relay
costs on this machine at this time, as CPU per token moves with the host's state, and (f)
what one more process and two more sockets on the way cost, which no relay avoids. A
cycle is one round per path, all with the same prompts (the cycle's seed; vLLM's prefix
cache is off, so each round costs vLLM the same), the order rotating from cycle to cycle;
a warm-up round per path comes first. The client runs every round in one process
(vllm_bench_driver.py), so vLLM's import is paid once.

When vLLM was started for this scenario it has core 0 to itself (taskset and
VLLM_CPU_OMP_THREADS_BIND=0, VLLM_CPU_NUM_OF_RESERVED_CPU=0), and the relaying processes
and the client share core 1: a GPU machine's split, where the worker does not take CPU
from the model. A reused vLLM (`--real-vllm`) is taken as it runs, and nothing is pinned.

Reported per path, over every measured round: TTFT p50 and p99 and ITL p50 as vLLM's
client counts them (its TTFT is the first chunk with choices: vLLM's role chunk, on every
path, as the local endpoint does not hold it and the load-balancing server relays bytes
as they come), output tokens/s (all rounds' output tokens over their durations, and its
ratio to (a)'s), the median request latency, and each relaying process's CPU per relayed
output token: utime + stime from /proc/<pid>/stat over its rounds, divided by their
output tokens. Paired: each cycle's TTFT p50 and p99 minus those of the cycle's direct
round, and its tokens/s over theirs, as the median (and quartiles) over cycles
(`paired`); the targets are read from these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.measure import Background, ms, percentile
from benchmarks.processes import (
    PROJECT,
    Process,
    external_env,
    lb_server,
    local_endpoint,
    on_core,
    reference_proxy,
    reference_splice,
    tiny_model,
    vllm_python,
)

INPUT = OUTPUT = 64
DIRECT = "(a) vLLM directly"
LOCAL = "(c) local endpoint /v2/<id>/openai/v1"
LB = "(d) load-balancing server /v1"
REFERENCE = "(e) reference: ten-line starlette + httpx proxy"
SPLICE = "(f) floor: bytes spliced both ways, no HTTP"
DRIVER = PROJECT / "benchmarks" / "vllm_bench_driver.py"


def common_args(model: str, concurrency: int) -> list[str]:
    return ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(tiny_model()),
            "--dataset-name", "random", "--random-input-len", str(INPUT),
            "--random-output-len", str(OUTPUT), "--ignore-eos", "--temperature", "0",
            "--max-concurrency", str(concurrency), "--ready-check-timeout-sec", "0",
            "--num-warmups", "0", "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,99", "--save-detailed", "--disable-tqdm"]


def plan(paths: list[tuple[str, str, int | None]], prompts: int, cycles: int,
         warmup: int) -> list[dict[str, Any]]:
    """A warm-up round per path, then `cycles` rounds per path, alternating, rotating."""
    rounds = [{"name": name, "base_url": url, "pid": pid, "seed": 1000, "prompts": warmup,
               "warmup": True} for name, url, pid in paths]
    for cycle in range(cycles):
        shift = cycle % len(paths)
        for name, url, pid in paths[shift:] + paths[:shift]:
            rounds.append({"name": name, "base_url": url, "pid": pid, "seed": cycle,
                           "prompts": prompts, "warmup": False})
    return rounds


def drive(work: Path, spec: dict[str, Any], core: int | None, timeout: float
          ) -> list[dict[str, Any]]:
    """The driver in vLLM's environment, to the end; its rounds' JSON lines."""
    (work / "bench-serve.json").write_text(json.dumps(spec), encoding="utf-8")
    out = work / "bench-serve-rounds.jsonl"
    client = Process(on_core([vllm_python(), "-P", str(DRIVER), str(work / "bench-serve.json"),
                              str(out)], core), work / "bench-serve-client.log",
                     {**os.environ, "HF_HUB_OFFLINE": "1"})
    client.start()
    assert client.proc is not None
    try:
        code = client.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        client.stop()
        raise RuntimeError(f"vllm bench serve did not finish in {timeout:g} s:\n"
                           f"{client.tail()}") from None
    if code != 0:
        raise RuntimeError(f"vllm bench serve exited {code}:\n{client.tail()}")
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def summary(name: str, measured: list[dict[str, Any]], direct: list[dict[str, Any]] | None
            ) -> dict[str, Any]:
    """One path's figures over its rounds; beside `direct`'s rounds, when given."""
    ttfts = [t for r in measured for t in r["ttfts"]]
    itls = [t for r in measured for request in r["itls"] for t in request]
    tokens = sum(r["output_tokens"] for r in measured)
    seconds = sum(r["duration_s"] for r in measured)
    cpu = [r["worker_cpu_s"] for r in measured if r["worker_cpu_s"] is not None]
    row: dict[str, Any] = {
        "path": name, "rounds": len(measured), "requests": sum(r["completed"] for r in measured),
        "failed": sum(r["failed"] for r in measured), "output_tokens": tokens,
        "ttft_p50_ms": ms(percentile(ttfts, 0.5)), "ttft_p99_ms": ms(percentile(ttfts, 0.99)),
        "itl_p50_ms": ms(percentile(itls, 0.5)),
        "latency_p50_ms": ms(percentile([t for r in measured for t in r["latencies"]], 0.5)),
        "tokens_per_s": round(tokens / seconds, 1),
        "rounds_tokens_per_s": [round(r["output_throughput"]) for r in measured],
        "rounds_ttft_p50_ms": [round(percentile(r["ttfts"], 0.5) * 1000, 1) for r in measured],
        "worker_cpu_us_per_token": round(sum(cpu) / tokens * 1e6, 1) if cpu else None,
        "worker_cpu_s": round(sum(cpu), 2) if cpu else None,
    }
    if direct is not None:
        base = summary("", direct, None)
        row.update(ttft_p50_minus_direct_ms=round(row["ttft_p50_ms"] - base["ttft_p50_ms"], 3),
                   ttft_p99_minus_direct_ms=round(row["ttft_p99_ms"] - base["ttft_p99_ms"], 3),
                   tokens_per_s_ratio=round(row["tokens_per_s"] / base["tokens_per_s"], 3),
                   **paired(measured, direct))
    return row


def paired(measured: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, Any]:
    """Each cycle's round against the direct round of the same cycle (same prompts, seconds
    apart), as the median over cycles: vLLM's own speed drifts from one round to another
    by more than a relay costs, and a drift falls on both rounds of a cycle alike."""
    by_cycle = {r["seed"]: r for r in direct}
    pairs = [(r, by_cycle[r["seed"]]) for r in measured if r["seed"] in by_cycle]

    def ttft(at: float) -> list[float]:
        return [percentile(r["ttfts"], at) - percentile(d["ttfts"], at) for r, d in pairs]

    p50, p99 = ttft(0.5), ttft(0.99)
    ratio = [r["output_throughput"] / d["output_throughput"] for r, d in pairs]
    return {"paired_cycles": len(pairs),
            "paired_ttft_p50_minus_direct_ms": ms(percentile(p50, 0.5)),
            "paired_ttft_p50_minus_direct_iqr_ms": [ms(percentile(p50, 0.25)),
                                                    ms(percentile(p50, 0.75))],
            "paired_ttft_p99_minus_direct_ms": ms(percentile(p99, 0.5)),
            "paired_tokens_per_s_ratio": round(percentile(ratio, 0.5), 3),
            "paired_tokens_per_s_ratio_iqr": [round(percentile(ratio, 0.25), 3),
                                              round(percentile(ratio, 0.75), 3)]}


async def scenario(work: Path, vllm_url: str, model: str, pinned: bool, prompts: int,
                   cycles: int, warmup: int, concurrency: int) -> dict[str, Any]:
    core = 1 if pinned else None
    env = external_env(vllm_url, MODEL_NAME=model)
    with contextlib.ExitStack() as running:
        local, local_base = await asyncio.to_thread(local_endpoint, work, env,
                                                    "bench-serve-endpoint", 60, core)
        running.callback(local.stop)
        lb, lb_base = await asyncio.to_thread(lb_server, work, env, "bench-serve-lb", 60, core)
        running.callback(lb.stop)
        proxy, proxy_base = await asyncio.to_thread(reference_proxy, work, vllm_url, core)
        running.callback(proxy.stop)
        splice, splice_base = await asyncio.to_thread(reference_splice, work, vllm_url, core)
        running.callback(splice.stop)
        paths = [(DIRECT, vllm_url, None), (LOCAL, f"{local_base}/openai", local.pid),
                 (LB, lb_base, lb.pid), (REFERENCE, proxy_base, proxy.pid),
                 (SPLICE, splice_base, splice.pid)]
        spec = {"vllm_url": vllm_url, "common": common_args(model, concurrency),
                "rounds": plan(paths, prompts, cycles, warmup)}
        background = Background().start()
        rounds = await asyncio.to_thread(drive, work, spec, core, 1800)
        cores = background.cores()
    failed = [r for r in rounds if r["failed"]]
    if failed:
        raise RuntimeError(f"requests failed in round {failed[0]['name']}: "
                           f"{failed[0]['errors']}")
    measured = [r for r in rounds if not r["warmup"]]
    direct = [r for r in measured if r["name"] == DIRECT]
    rows = [summary(DIRECT, direct, None)] + [
        summary(name, [r for r in measured if r["name"] == name], direct)
        for name in (LOCAL, LB, REFERENCE, SPLICE)]
    for row in rows:
        row["background_cores"] = cores
    return {"input_tokens": INPUT, "output_tokens": OUTPUT, "concurrency": concurrency,
            "prompts_per_round": prompts, "cycles": cycles, "pinned": pinned, "model": model,
            "order": [r["name"] for r in measured], "rows": rows}
