"""The targets, judged from the results, and the results as Markdown.

`targets(results)` returns one entry per target the README names: what it asks,
what was measured, and whether it was met. `markdown(results)` renders every
scenario's table and the targets; `results.json` holds the same figures, and more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks import ceiling_report

Columns = Sequence[tuple[str, str]]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Columns) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    scenarios = {key: value for key, value in results["scenarios"].items()
                 if "failed" not in value and "skipped" not in value}

    def add(name: str, wanted: str, measured: str | None, met: bool | None) -> None:
        found.append({"target": name, "wanted": wanted, "measured": measured or "not run",
                      "met": met})

    over = scenarios.get("1_overhead")
    b1 = _row(over["rows"], concurrency=1, path="(b) handler(job), SDK-driven") if over else None
    add("overhead (b), concurrency 1", "p50 within 0.5 ms of direct",
        b1 and f"{b1['p50_minus_direct_ms']:+.3f} ms", b1 and b1["p50_minus_direct_ms"] <= 0.5)
    relay = scenarios.get("2_stream_relay")
    most = max((r["streams"] for r in relay["rows"]), default=0) if relay else 0
    b2 = _row(relay["rows"], streams=most, path="(b) handler(job), SDK-driven") if relay else None
    add(f"relay (b), {most or 'the most'} streams", "at least 0.9 of direct events/s",
        b2 and f"{b2['ratio_to_direct']:.2f}", b2 and b2["ratio_to_direct"] >= 0.9)
    posts = scenarios.get("3_stream_posts")
    if posts:
        rows = posts["rows"]
        first = max(r["first_yield_ms_max"] for r in rows)
        held = max(r["held_ms_max"] for r in rows)
        limit = rows[0]["held_limit_ms"]
        add("first yield (20 ms consumer)", "within 5 ms of the upstream's first event",
            f"{first:.1f} ms (worst)", first <= 5)
        add("events held (20 ms consumer)",
            f"at most consumer + flush interval = {limit:g} ms", f"{held:.1f} ms (worst)",
            held <= limit)
        add("yields per stream", "at most duration / flush interval + 2",
            ", ".join(f"{r['yields']} ≤ {r['yield_bound']}" for r in rows),
            all(r["yields_within_bound"] for r in rows))
    else:
        for name in ("first yield (20 ms consumer)", "events held (20 ms consumer)",
                     "yields per stream"):
            add(name, "-", None, None)
    start = scenarios.get("4_startup")
    add("start-up overhead", "at most 0.3 s beyond the upstream's own",
        start and (f"{start['overhead']['median_s']:.3f} s median, "
                   f"{start['overhead']['max_s']:.3f} s max"),
        start and start["overhead"]["median_s"] <= 0.3)
    slowest = max(start["locator"]["found_p50_ms"], start["locator"]["missing_p50_ms"]) \
        if start else None
    add(f"locator, {start['locator']['models'] if start else 1000} cached models",
        "under 50 ms", start and f"{slowest:.1f} ms (p50, slower case)",
        start and slowest is not None and slowest < 50)
    memory = scenarios.get("6_memory")
    add("worker memory, idle", "under 100 MB", memory and f"{memory['idle_rss_mb']:.1f} MB",
        memory and memory["idle_rss_mb"] < 100)
    first = scenarios.get("7_first_token")
    for consumer in ("instant consumer", "20 ms consumer"):
        rows = [r for r in first["rows"] if r["path"] == f"(b) handler(job), {consumer}"] \
            if first else []
        add(f"first content token (b), {consumer}",
            "p50 within 2 ms, p90 within 5 ms of direct",
            rows and ", ".join(f"{r['p50_minus_direct_ms']:+.2f} / {r['p90_minus_direct_ms']:+.2f}"
                               f" ms ({'idle' if r['idle_before_s'] else 'back to back'})"
                               for r in rows),
            all(r["p50_minus_direct_ms"] <= 2 and r["p90_minus_direct_ms"] <= 5 for r in rows)
            if rows else None)
    serve = scenarios.get("8_bench_serve")
    reference = _row(serve["rows"], path="(e) reference: ten-line starlette + httpx proxy") \
        if serve else None
    floor = _row(serve["rows"], path="(f) floor: bytes spliced both ways, no HTTP") \
        if serve else None
    cpu = reference["worker_cpu_us_per_token"] if reference else None
    spliced = floor["paired_ttft_p50_minus_direct_ms"] if floor else None
    for short, path, p50 in (
            ("local endpoint", "(c) local endpoint /v2/<id>/openai/v1", 1.5),
            ("load-balancing server", "(d) load-balancing server /v1", 1.0)):
        row = _row(serve["rows"], path=path) if serve else None
        over = row["paired_ttft_p50_minus_direct_ms"] - spliced \
            if row and spliced is not None else None
        add(f"bench serve, {short}: TTFT",
            f"p50 within {p50:g} ms of the byte splice (f), p99 within 10 ms of direct "
            "(paired)",
            row and over is not None
            and f"{over:+.2f} ms over (f); p99 {row['paired_ttft_p99_minus_direct_ms']:+.2f} ms"
                f" (p50 {row['paired_ttft_p50_minus_direct_ms']:+.2f}, (f) {spliced:+.2f}, "
                f"(e) {reference['paired_ttft_p50_minus_direct_ms']:+.2f} ms over direct)"
            if reference else None,
            row and over is not None and over <= p50
            and row["paired_ttft_p99_minus_direct_ms"] <= 10)
        add(f"bench serve, {short}: tokens/s", "at least 0.97 of direct (paired)",
            row and f"{row['paired_tokens_per_s_ratio']:.3f}",
            row and row["paired_tokens_per_s_ratio"] >= 0.97)
        used = row["worker_cpu_us_per_token"] if row else None
        add(f"bench serve, {short}: CPU per token",
            "at most half the ten-line httpx proxy's (e), beside it",
            row and cpu and f"{used:.1f} µs, (e) {cpu:.1f} µs",
            row and cpu and used <= cpu / 2)
    found += ceiling_report.targets(scenarios.get("11_relay_ceiling"))
    return found


OVERHEAD: Columns = [("path", "path"), ("concurrency", "concurrency"), ("requests", "requests"),
                     ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                     ("p50_minus_direct_ms", "p50 − (a) ms"),
                     ("p50_ratio_to_direct", "p50 / (a)"), ("requests_per_s", "requests/s"),
                     ("background_cores", "other load (cores)")]
RELAY: Columns = [("path", "path"), ("streams", "streams"), ("events_per_s", "events/s"),
                  ("ratio_to_direct", "/ (a)"),
                  ("worker_cpu_s_per_1000_events", "CPU s / 1,000 events"),
                  ("upstream_cpu_s_per_1000_events", "stand-in CPU s / 1,000 events"),
                  ("rounds_events_per_s", "each round, events/s"),
                  ("background_cores", "other load (cores)")]
POSTS: Columns = [("stream", "stream"), ("tokens", "tokens"), ("runs", "runs"),
                  ("duration_s", "duration s"), ("yields", "yields (posts)"),
                  ("yield_bound", "bound"), ("first_yield_ms_max", "first yield ms"),
                  ("bare_client_first_event_ms_max", "bare client, first event ms"),
                  ("first_token_ms_max", "first token ms"), ("held_ms_max", "max held ms"),
                  ("held_limit_ms", "held limit ms"), ("background_cores", "other load (cores)")]
REAL: Columns = [("path", "path"), ("concurrency", "concurrency"), ("requests", "requests"),
                 ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                 ("total_p50_ms", "total p50 ms"), ("total_p99_ms", "total p99 ms"),
                 ("ttft_p50_ratio", "TTFT p50 / vLLM"), ("total_p50_ratio", "total p50 / vLLM"),
                 ("worker_cpu_wait_ms_per_request", "endpoint waited for a CPU, ms/request"),
                 ("background_cores", "other load (cores)")]
FIRST: Columns = [("regime", "regime"), ("path", "path"), ("requests", "requests"),
                  ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
                  ("p50_minus_direct_ms", "p50 − (a) ms"), ("p90_minus_direct_ms", "p90 − (a) ms"),
                  ("role_chunk_p50_ms", "role chunk p50 ms"),
                  ("background_cores", "other load (cores)")]
SERVE: Columns = [("path", "path"), ("requests", "requests"), ("output_tokens", "output tokens"),
                  ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                  ("ttft_p50_minus_direct_ms", "p50 − (a) ms"),
                  ("ttft_p99_minus_direct_ms", "p99 − (a) ms"), ("itl_p50_ms", "ITL p50 ms"),
                  ("latency_p50_ms", "request p50 ms"),
                  ("tokens_per_s", "output tokens/s"), ("tokens_per_s_ratio", "/ (a)"),
                  ("paired_ttft_p50_minus_direct_ms", "paired p50 − (a) ms"),
                  ("paired_ttft_p50_minus_direct_iqr_ms", "its quartiles"),
                  ("paired_ttft_p99_minus_direct_ms", "paired p99 − (a) ms"),
                  ("paired_tokens_per_s_ratio", "paired / (a)"),
                  ("paired_tokens_per_s_ratio_iqr", "its quartiles"),
                  ("worker_cpu_us_per_token", "relay CPU µs / token"),
                  ("background_cores", "other load (cores)")]
COLD: Columns = [("regime", "regime"), ("launches", "launches"),
                 ("healthy_s", "launch → /ping 200 s (median)"),
                 ("healthy_s_each", "each launch, s"),
                 ("healthy_minus_cold_s", "− cold s"),
                 ("first_answer_s", "launch → first answer s (median)"),
                 ("tokens_per_s", "output tokens/s"), ("tokens_per_s_ratio", "/ cold")]
LORA_LOADS: Columns = [("request", "request"), ("p50_ms", "p50 ms"), ("max_ms", "max ms")]
LORA_SERVE: Columns = [("path", "requests to"), ("requests", "requests"),
                       ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
                       ("ttft_p50_minus_direct_ms", "p50 − (a) ms"),
                       ("latency_p50_ms", "request p50 ms"),
                       ("tokens_per_s", "output tokens/s"), ("tokens_per_s_ratio", "/ (a)"),
                       ("rounds_tokens_per_s", "each round, tokens/s")]
TARGETS: Columns = [("target", "target"), ("wanted", "wanted"), ("measured", "measured"),
                    ("met", "met")]


def _startup(start: dict[str, Any]) -> str:
    rows = [{"what": label, "median": start[key]["median_s"], "max": start[key]["max_s"]}
            for label, key in (("worker launch → first job-take", "worker_total"),
                               ("stand-in's own start → listening", "upstream_own"),
                               ("**overhead** (difference)", "overhead"),
                               ("… launch → stand-in spawned", "before_spawn"),
                               ("… stand-in listening → first job-take", "after_healthy"))]
    imports = start["imports"]
    locator = start["locator"]
    return "\n\n".join([
        f"Stand-in healthy {start['healthy_after_s']:g} s after binding its port; "
        f"{start['launches']} launches; other load {start['background_cores']} cores.",
        table(rows, [("what", "seconds"), ("median", "median"), ("max", "max")]),
        f"Fresh interpreter: {imports['interpreter_s']:.3f} s; `import handler` adds "
        f"{imports['import_handler_s']:.3f} s; `import runpod` adds "
        f"{imports['import_runpod_s']:.3f} s.",
        table([{"case": "model in the cache", "p50": locator["found_p50_ms"],
                "max": locator["found_max_ms"]},
               {"case": "model not cached (every place searched)",
                "p50": locator["missing_p50_ms"], "max": locator["missing_max_ms"]}],
              [("case", f"locator, {locator['models']:,} cached models"), ("p50", "p50 ms"),
               ("max", f"max ms ({locator['runs']} runs)")]),
    ])


def _memory(memory: dict[str, Any]) -> str:
    row = {**memory, "heartbeat": memory["sdk_heartbeat_rss_mb"]["idle"],
           "posts": memory["stream_posts_per_job"]["median"]}
    return table([row], [("idle_rss_mb", "idle MB"),
                         ("peak_rss_mb", f"peak MB, {memory['streams']} streams"),
                         ("after_rss_mb", "after MB"), ("heartbeat", "SDK heartbeat MB"),
                         ("events_per_s", "events/s"),
                         ("worker_cpu_s_per_1000_events", "CPU s / 1,000 events"),
                         ("posts", "stream posts per job (median)"),
                         ("background_cores", "other load (cores)")])


def _real(real: dict[str, Any]) -> str:
    if real["started_here"]:
        where = (f"vLLM started by the local endpoint in {real['start_seconds']:g} s: "
                 f"`{real['vllm_command']}`")
    else:
        where = "A running local endpoint and its vLLM were reused."
    return where + "\n\n" + table(real["rows"], REAL)


def _where(section: dict[str, Any]) -> str:
    if section["vllm_started_here"]:
        return (f"vLLM started for scenarios 7 and 8 in {section['vllm_start_s']:g} s, pinned: "
                f"`{section['vllm_command']}` with VLLM_CPU_OMP_THREADS_BIND=0 and "
                "VLLM_CPU_NUM_OF_RESERVED_CPU=0; this process, the worker's processes and the "
                "client on core 1.")
    return "A running vLLM was reused, as it runs (nothing pinned)."


def _first(first: dict[str, Any]) -> str:
    return (f"{_where(first)} Model `{first['model']}`, {first['tokens']} tokens per request; "
            f"{first['rounds']} rounds per regime, one request by each path per round, the "
            f"order rotating; the 20 ms consumer is the platform's stream post "
            f"({first['post_delay_ms']:g} ms). The time is to the first event with non-empty "
            "content; the role chunk column is when vLLM's role chunk reached (a).\n\n"
            + table(first["rows"], FIRST))


def _serve(serve: dict[str, Any]) -> str:
    return (f"{_where(serve)} `vllm bench serve --backend openai-chat --dataset-name random "
            f"--random-input-len {serve['input_tokens']} --random-output-len "
            f"{serve['output_tokens']} --ignore-eos --temperature 0 --max-concurrency "
            f"{serve['concurrency']}`, {serve['prompts_per_round']} prompts per round, "
            f"{serve['cycles']} cycles of one round per path (the same prompts within a "
            "cycle, the order rotating), after a warm-up round each. TTFT and ITL as vLLM's "
            "client counts them; relay CPU: the relaying process's utime + stime over its "
            "rounds, per output token. Paired: each cycle's round against that cycle's "
            "direct round (same prompts, seconds apart), as the median (and quartiles) over "
            "cycles, which the targets read; vLLM's own speed moves from round to round by "
            "more than a relay costs (the rounds' tokens/s are in results.json). (e) is a "
            "throwaway ten-line "
            "starlette + httpx proxy and (f) a splice that copies bytes both ways with no "
            "HTTP at all; neither is the worker: they show what the least a Python HTTP "
            "relay, and any relay, costs here, measured beside it.\n\n"
            + table(serve["rows"], SERVE))


def _cold(cold: dict[str, Any]) -> str:
    timelines = "\n".join(f"- {row['regime']}: `{row['timeline']}`" for row in cold["rows"])
    started = ("the stand-in vLLM (quick mode)" if cold.get("stand_in")
               else "vLLM (tiny model, CPU build)")
    return (f"`python handler.py` as a load-balancing server starting {started}, "
            f"{cold['launches']} launches per regime, interleaved; then "
            f"{cold['requests']} streamed requests of {cold['tokens']} tokens, "
            f"{cold['concurrency']} at a time, for the throughput.\n\n"
            + table(cold["rows"], COLD)
            + "\n\nThe worker's start-up line, last launch of each regime:\n\n" + timelines)


def _lora(lora: dict[str, Any]) -> str:
    upstream = "the stand-in vLLM (quick mode)" if lora.get("stand_in") else \
        "the tiny model (CPU build)"
    return (f"The load-balancing server on {upstream} with {lora['adapters']} adapters "
            f"in `LORA_MODULES` (`MAX_LORAS={lora['adapters']}`) and {lora['on_demand']} in "
            "`LORA_DIR`, rank 8. One 16-token chat completion at a time, for each on-demand "
            "adapter in turn:\n\n" + table(lora["load_rows"], LORA_LOADS)
            + f"\n\n`vllm bench serve` through the server, {lora['input_tokens']} tokens in "
            f"and {lora['output_tokens']} out, concurrency {lora['concurrency']}, "
            f"{lora['prompts_per_round']} prompts per round, {lora['cycles']} cycles "
            "alternating (b) (`--lora-modules` with every static adapter: one at random per "
            "request) with (a):\n\n" + table(lora["rows"], LORA_SERVE))


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    scenarios = results["scenarios"]
    parts = [
        "# Benchmark results",
        f"{machine['date']} · {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gb']} GB · {machine['os']} · Python {machine['python']} · "
        f"mode: {results['mode']} · `{results['command']}` · {results['seconds']:.0f} s · "
        f"load average at start {machine['load_average']}",
        "\"Other load\" is the CPU (in cores) that processes outside the benchmark used while "
        "a table was measured; figures taken under load are slower than the machine can do.",
        "## Targets",
        table(results["targets"], TARGETS),
    ]
    sections = [
        ("1_overhead", "1. Request overhead (non-streaming chat completion, 16 tokens)",
         lambda s: table(s["rows"], OVERHEAD)),
        ("2_stream_relay", "2. Stream relay (streams of vLLM-shaped chunks, flat out)",
         lambda s: f"{s['events_per_stream']} events per stream; flush interval "
                   f"{s['flush_interval_s']} s. CPU: the client's for the stand-in and (a), "
                   "this process (worker + SDK loop) for (b), the endpoint process for (c)."
                   "\n\n" + table(s["rows"], RELAY)),
        ("3_stream_posts", "3. Stream posts and latency (handler, 20 ms per post)",
         lambda s: f"Post delay {s['post_delay_ms']:g} ms; flush interval "
                   f"{s['flush_interval_ms']:g} ms. Each stream runs alone; each row shows the "
                   "worst of its runs.\n\n" + table(s["rows"], POSTS)),
        ("4_startup", "4. Start-up", _startup),
        ("5_real_vllm", "5. Real vLLM on CPU (tiny model, streamed, 32 tokens)", _real),
        ("6_memory", "6. Worker memory (python handler.py under the Runpod SDK, no vLLM)",
         _memory),
        ("7_first_token", "7. First content token on the real vLLM (tiny model, CPU build)",
         _first),
        ("8_bench_serve", "8. vllm bench serve: direct, local endpoint, load-balancing server",
         _serve),
        ("9_cold_start", "9. Cold start: compile cache cold, warm, and ENFORCE_EAGER", _cold),
        ("10_lora", "10. LoRA adapters: loaded on demand, served in rotation", _lora),
        ("11_relay_ceiling", "11. The relay's ceiling: one worker process, flat out, pinned",
         lambda s: ceiling_report.render(s, table)),
    ]
    for key, title, render in sections:
        parts.append(f"## {title}")
        section = scenarios.get(key)
        if section is None:
            parts.append("Not run.")
        elif "failed" in section:
            parts.append(f"**Failed:** {section['failed']}")
        else:
            if section.get("measured", machine["date"]) != machine["date"]:
                parts.append(f"Measured {section['measured']}, in an earlier run.")
            if section.get("waited_for_quiet_s"):
                parts.append(f"Started after waiting {section['waited_for_quiet_s']:g} s for "
                             "other processes to leave the CPU.")
            parts.append(render(section))
    return "\n\n".join(parts) + "\n"
