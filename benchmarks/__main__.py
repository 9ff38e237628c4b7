"""`python -m benchmarks [--quick] [--out DIR] [--only 1,2,...]`, from the project root.

Measures what the worker adds between the platform and vLLM, next to the physical
limit, and writes `results.json` and `results.md` to `--out` (default
benchmarks/results). Scenarios, each described in its module:

1. overhead.py       request overhead, non-streaming, (a) direct / (b) handler / (c) endpoint
2. stream_relay.py   many concurrent streams flat out: events/s and CPU per event
3. stream_posts.py   a 20 ms platform post: yields per stream, first yield, time held
4. startup_time.py   launch to first job-take, minus the upstream's own start; the locator
5. real_vllm.py      the tiny model on vLLM's CPU build, directly and through the endpoint
6. memory.py         the worker's resident memory, idle and under the largest stream load
7. first_token.py    time to the first content token on the real vLLM: direct / handler / endpoint
8. bench_serve.py    `vllm bench serve`: direct / local endpoint / load-balancing server
9. cold_start.py     a worker's launch to /ping 200 and its first answer: cold / warm / eager
10. lora_serving.py  an adapter loaded on demand; adapters in rotation against the base
11. relay_ceiling.py the most tokens/s one worker process relays, in each mode, pinned

1-4, 6 and 11 run against fakes.vllm, a stand-in that speaks vLLM's wire format. Scenario 5
starts the local endpoint with vLLM (a minute or more to load) unless `--real-endpoint`
and `--real-vllm` name a running pair (its API key in LOCAL_API_KEY). Scenarios 7 and 8
share one vLLM they start on core 0 (the worker's processes and this one on core 1), or
take the one `--real-vllm` names, as it runs. Scenarios 9 and 10 launch workers of
their own, each starting its vLLM. Scenario 11 starts its stand-in on core 0 and one
worker of each mode on core 1. `--ceiling-before FILE` (a results.json in which scenario
11 ran on an earlier commit) keeps that run's rows beside this one's as a before -> after
note, which later runs of 11 carry over.

A run of some scenarios only (`--only`) keeps the other scenarios' results from the
results.json already in `--out` (when it is of the same mode), each with its own date.

`--quick` runs every scenario with small counts in well under a minute (plus vLLM's
start for 5, 7 and 8, unless reused; the workers of 9 and 10 run on the stand-in): it
proves the suite runs; its figures mean nothing. A full run starts each scenario once
other processes leave the CPU (up to 3 minutes' wait; each table shows the load that
remained). A scenario that fails is recorded as failed and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_serve,
    cold_start,
    first_token,
    lora_serving,
    memory,
    overhead,
    real_vllm,
    relay_ceiling,
    startup_time,
    stream_posts,
    stream_relay,
)
from benchmarks.measure import Background, machine
from benchmarks.paths import InProcess, direct, endpoint
from benchmarks.processes import (
    PROJECT,
    SERVED,
    Process,
    external_env,
    local_endpoint,
    pin_threads,
    upstream,
    vllm_server,
)
from benchmarks.report import markdown, targets

ALL = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
CEILING = "11_relay_ceiling"
QUIET_CORES = 0.25  # other processes' load under which a full run's scenario starts
QUIET_WAIT = 180.0  # seconds a full run waits for that, then starts anyway


@dataclass(frozen=True)
class Counts:
    overhead_concurrency: tuple[int, ...]
    overhead_requests: int
    overhead_rounds: int
    relay_streams: tuple[int, ...]
    relay_tokens: int
    relay_rounds: int
    post_kinds: tuple[tuple[str, int, float], ...]
    post_repeats: int
    healthy_after: float
    launches: int
    cached_models: int
    locate_runs: int
    real_concurrency: tuple[int, ...]
    real_requests: int
    real_rounds: int
    memory_streams: int
    memory_tokens: int
    settle: float
    first_rounds: int
    first_idle: float
    serve_prompts: int
    serve_cycles: int
    serve_warmup: int
    serve_concurrency: int
    cold_launches: int
    cold_requests: int
    cold_regimes: tuple[str, ...]
    cold_stand_in: bool
    lora_prompts: int
    lora_cycles: int
    lora_stand_in: bool
    ceiling_streams: tuple[int, ...]
    ceiling_seconds: float
    ceiling_warmup: float
    ceiling_rounds: int
    ceiling_tokens: tuple[int, int]


FULL = Counts(
    overhead_concurrency=(1, 64), overhead_requests=3000, overhead_rounds=6,
    relay_streams=(64, 256), relay_tokens=1000, relay_rounds=5,
    post_kinds=(("1,000 tokens at 100/s", 1000, 0.01), ("1,000 tokens at 1,000/s", 1000, 0.001),
                ("1,000 tokens flat out", 1000, 0.0)),
    post_repeats=3, healthy_after=2.0, launches=5, cached_models=1000, locate_runs=20,
    real_concurrency=(1, 16), real_requests=96, real_rounds=3,
    memory_streams=256, memory_tokens=1000, settle=2.0,
    first_rounds=60, first_idle=0.5,
    serve_prompts=48, serve_cycles=20, serve_warmup=16, serve_concurrency=8,
    cold_launches=3, cold_requests=48, cold_regimes=cold_start.REGIMES, cold_stand_in=False,
    lora_prompts=64, lora_cycles=4, lora_stand_in=False,
    ceiling_streams=(256, 1024), ceiling_seconds=12.0, ceiling_warmup=3.0, ceiling_rounds=3,
    ceiling_tokens=(250, 750))
QUICK = Counts(
    overhead_concurrency=(1, 8), overhead_requests=60, overhead_rounds=2,
    relay_streams=(8,), relay_tokens=100, relay_rounds=1,
    post_kinds=(("30 tokens at 100/s", 30, 0.01), ("200 tokens flat out", 200, 0.0)),
    post_repeats=1, healthy_after=0.3, launches=1, cached_models=50, locate_runs=3,
    real_concurrency=(1, 2), real_requests=4, real_rounds=1,
    memory_streams=8, memory_tokens=100, settle=0.5,
    first_rounds=3, first_idle=0.1,
    serve_prompts=16, serve_cycles=1, serve_warmup=8, serve_concurrency=8,
    cold_launches=1, cold_requests=4, cold_regimes=("ENFORCE_EAGER=true",), cold_stand_in=True,
    lora_prompts=8, lora_cycles=1, lora_stand_in=True,
    ceiling_streams=(8, 32), ceiling_seconds=1.0, ceiling_warmup=0.3, ceiling_rounds=1,
    ceiling_tokens=(20, 100))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: proves it runs")
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results",
                        help="folder for results.json and results.md")
    parser.add_argument("--only", default=",".join(map(str, ALL)),
                        help="scenarios to run, e.g. 1,3 (default: all)")
    parser.add_argument("--real-endpoint", help="a running local endpoint's /v2/<id> URL")
    parser.add_argument("--real-vllm", help="the vLLM server behind --real-endpoint; alone, "
                        "the vLLM scenarios 7 and 8 use")
    parser.add_argument("--ceiling-before", type=Path,
                        help="a results.json where scenario 11 ran on an earlier commit: kept "
                        "as a before -> after note")
    args = parser.parse_args(argv)
    args.only = {int(part) for part in args.only.split(",") if part.strip()}
    if not args.only <= set(ALL):
        parser.error(f"--only takes scenario numbers from {ALL}")
    if args.real_endpoint and not args.real_vllm:
        parser.error("--real-endpoint needs --real-vllm, the vLLM behind it")
    if args.real_vllm and not args.real_endpoint and 5 in args.only:
        parser.error("scenario 5 needs --real-endpoint beside --real-vllm")
    if args.ceiling_before and "rows" not in _ceiling(args.ceiling_before):
        parser.error(f"{args.ceiling_before} holds no results of scenario 11")
    return args


class Runner:
    """Runs the chosen scenarios, each recorded under its key, failures included."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.counts = QUICK if args.quick else FULL
        self.scenarios: dict[str, Any] = {}
        self.started = time.monotonic()

    async def step(self, number: int, key: str, run: Callable[[], Awaitable[dict[str, Any]]]
                   ) -> None:
        if number not in self.args.only:
            return
        waited = 0.0 if self.args.quick else await self.quiet()
        name = key.split("_", 1)[1]
        print(f"[{time.monotonic() - self.started:6.1f} s] scenario {number}: {name}",
              file=sys.stderr, flush=True)
        try:
            self.scenarios[key] = {**await run(), "waited_for_quiet_s": waited}
        except Exception as exc:  # recorded, reported, and the command exits 1
            traceback.print_exc()
            self.scenarios[key] = {"failed": f"{type(exc).__name__}: {exc}"[:2000]}

    async def quiet(self) -> float:
        """Wait until other processes leave the CPU (up to QUIET_WAIT); seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < QUIET_WAIT:
            meter = Background().start()
            await asyncio.sleep(2)
            cores = meter.cores()
            if cores < QUIET_CORES:
                break
            print(f"other processes use {cores} cores: waiting for the machine to calm down",
                  file=sys.stderr, flush=True)
        return round(time.monotonic() - started, 1)

    async def run(self) -> None:
        c, work = self.counts, self.work
        if self.args.only & {1, 2, 3}:
            stand_in, url = upstream(work)
            with stand_in:
                worker = InProcess(external_env(url))
                straight = direct(url, SERVED)
                process, base = local_endpoint(work, external_env(url))
                through = endpoint(base)
                try:
                    with process:
                        await self.step(1, "1_overhead", lambda: overhead.scenario(
                            url, straight, worker, through, list(c.overhead_concurrency),
                            c.overhead_requests, c.overhead_rounds))
                        await self.step(2, "2_stream_relay", lambda: stream_relay.scenario(
                            url, stand_in.pid, worker, through, process.pid, straight,
                            list(c.relay_streams), c.relay_tokens, c.relay_rounds))
                        await self.step(3, "3_stream_posts", lambda: stream_posts.scenario(
                            url, worker, list(c.post_kinds), c.post_repeats, 0.02))
                finally:
                    for client in (worker, straight, through):
                        await client.aclose()
        await self.step(4, "4_startup", lambda: startup_time.scenario(
            work, c.healthy_after, c.launches, c.cached_models, c.locate_runs))
        if 6 in self.args.only:
            stand_in, url = upstream(work, "memory-upstream")
            with stand_in:
                await self.step(6, "6_memory", lambda: memory.scenario(
                    work, url, c.memory_streams, c.memory_tokens, c.settle))
        reuse = None
        if self.args.real_endpoint:
            reuse = real_vllm.Reused(self.args.real_endpoint, self.args.real_vllm,
                                     os.environ.get("LOCAL_API_KEY"))
        await self.step(5, "5_real_vllm", lambda: real_vllm.scenario(
            work, reuse, list(c.real_concurrency), c.real_requests, c.real_rounds))
        if self.args.only & {7, 8}:
            await self.pinned_pair()
        own_workers = [
            self.step(9, "9_cold_start", lambda: cold_start.scenario(
                work, c.cold_launches, c.cold_requests, c.cold_regimes, c.cold_stand_in)),
            self.step(10, "10_lora", lambda: lora_serving.scenario(
                work, c.lora_prompts, c.lora_cycles, c.serve_warmup, c.serve_concurrency,
                c.lora_stand_in))]
        if self.args.quick:  # its figures mean nothing: both workers start at once
            await asyncio.gather(*own_workers)
        else:
            for step in own_workers:
                await step
        await self.step(11, CEILING, lambda: relay_ceiling.scenario(
            work, list(c.ceiling_streams), c.ceiling_seconds, c.ceiling_warmup,
            c.ceiling_rounds, c.ceiling_tokens))

    async def pinned_pair(self) -> None:
        """Scenarios 7 and 8 on one vLLM: started here on core 0, this process and the
        worker's on core 1; or the `--real-vllm` one, as it runs."""
        c, work = self.counts, self.work
        process: Process | None = None
        url, started = self.args.real_vllm, time.monotonic()
        if url is None:
            print(f"[{time.monotonic() - self.started:6.1f} s] starting vLLM on core 0 for "
                  "scenarios 7 and 8", file=sys.stderr, flush=True)
            try:
                process, url = await asyncio.to_thread(vllm_server, work, 0)
            except Exception as exc:
                error = exc

                async def fail() -> dict[str, Any]:
                    raise error

                await self.step(7, "7_first_token", fail)
                await self.step(8, "8_bench_serve", fail)
                return
        where = {"vllm_started_here": process is not None,
                 "vllm_start_s": round(time.monotonic() - started, 1) if process else None,
                 "vllm_command": " ".join(process.argv) if process else None}
        before = pin_threads({1}) if process is not None else None
        try:
            model = await real_vllm.served_model(url)
            await self.step(7, "7_first_token", lambda: with_(where, first_token.scenario(
                work, url, model, process is not None, c.first_rounds, c.first_idle)))
            await self.step(8, "8_bench_serve", lambda: with_(where, bench_serve.scenario(
                work, url, model, process is not None, c.serve_prompts, c.serve_cycles,
                c.serve_warmup, c.serve_concurrency)))
        finally:
            if before is not None:
                pin_threads(before)
            if process is not None:
                await asyncio.to_thread(process.stop, 60)


async def with_(extra: dict[str, Any], run: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    return {**await run, **extra}


def earlier(previous: Path, mode: str, ran: set[str]) -> dict[str, Any]:
    """The scenarios of an earlier run's results (same mode) that this run did not run,
    each with the date it was measured; none if there is no such file."""
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if old.get("mode") != mode:
        return {}
    return {key: {**value, "measured": value.get("measured", old["machine"]["date"])}
            for key, value in old.get("scenarios", {}).items()
            if key not in ran and "failed" not in value}


def _ceiling(results: Path) -> dict[str, Any]:
    """Scenario 11's section of a results.json (empty if there is none)."""
    try:
        section = json.loads(results.read_text(encoding="utf-8"))["scenarios"][CEILING]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return section if isinstance(section, dict) else {}


def before_note(given: Path | None, previous: Path, section: dict[str, Any]) -> None:
    """Scenario 11's before -> after note: the rows of `given` (a results.json where 11 ran
    on an earlier commit), else the note the previous results carried, if any."""
    if given is not None:
        old = _ceiling(given)
        section["before"] = {"commit": old.get("commit"), "measured": old.get("measured"),
                             "rows": old["rows"]}
    elif note := _ceiling(previous).get("before"):
        section["before"] = note


def write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2, ensure_ascii=False)),
                       ("results.md", markdown(results))):
        staging = out / f"{name}.tmp"
        staging.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        os.replace(staging, out / name)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="benchmarks-"))
    runner = Runner(args, work)
    results: dict[str, Any] = {
        "machine": machine(), "mode": "quick" if args.quick else "full",
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None
                                                       else sys.argv[1:])]),
    }
    asyncio.run(runner.run())
    results["seconds"] = round(time.monotonic() - runner.started, 1)
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    for section in runner.scenarios.values():
        section["measured"] = results["machine"]["date"]
    if "rows" in runner.scenarios.get(CEILING, {}):
        before_note(args.ceiling_before, args.out / "results.json", runner.scenarios[CEILING])
    kept = earlier(args.out / "results.json", results["mode"], set(runner.scenarios))
    if kept:
        results["kept_from_earlier_runs"] = sorted(kept)
    results["scenarios"] = dict(sorted({**kept, **runner.scenarios}.items()))
    results["targets"] = targets(results)
    write(args.out, results)
    failed = [key for key, value in runner.scenarios.items() if "failed" in value]
    print(f"Results in {args.out}/results.md and results.json ({results['seconds']:.0f} s).",
          file=sys.stderr)
    if failed:
        print(f"Failed: {', '.join(failed)}; logs kept in {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
