"""The targets, judged from the results, and the results as Markdown.

`targets(results)` returns one entry per target the README names: what it asks,
what was measured, and whether it was met. `markdown(results)` renders every
scenario's table and the targets; `results.json` holds the same figures, and more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
        b1 and f"+{b1['p50_minus_direct_ms']:.3f} ms", b1 and b1["p50_minus_direct_ms"] <= 0.5)
    relay = scenarios.get("2_stream_relay")
    most = max((r["streams"] for r in relay["rows"]), default=0) if relay else 0
    b2 = _row(relay["rows"], streams=most, path="(b) handler(job), SDK-driven") if relay else None
    add(f"relay (b), {most} streams", "at least 0.9 of direct events/s",
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
    ]
    for key, title, render in sections:
        parts.append(f"## {title}")
        section = scenarios.get(key)
        if section is None:
            parts.append("Not run.")
        elif "failed" in section:
            parts.append(f"**Failed:** {section['failed']}")
        else:
            if section.get("waited_for_quiet_s"):
                parts.append(f"Started after waiting {section['waited_for_quiet_s']:g} s for "
                             "other processes to leave the CPU.")
            parts.append(render(section))
    return "\n\n".join(parts) + "\n"
