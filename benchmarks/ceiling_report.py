"""Scenario 11's part of the report: its targets, its tables, and what would reach a target
one process does not (report.py renders the rest; kept apart so each module stays short)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.relay_ceiling import BALANCED, LOCAL, QUEUE

Table = Callable[[Sequence[dict[str, Any]], Sequence[tuple[str, str]]], str]
WANTED = {BALANCED: 50_000, QUEUE: 50_000, LOCAL: 25_000}  # events/s through one process
SHORT = {QUEUE: "(a) queue path", LOCAL: "(b) local endpoint",
         BALANCED: "(c) load-balancing server"}
FLAT = 1.25  # the most CPU per event may grow from the fewest streams to the most
FULL_CORE = 0.9  # busy + waiting for a CPU: below this the worker was not what ran out
COLUMNS = [("path", "path"), ("streams", "streams"), ("events_per_s", "events/s"),
           ("worker_cpu_us_per_event", "worker CPU µs / event"),
           ("worker_core_busy", "worker core busy"),
           ("worker_waited_for_cpu", "worker waited for a CPU"),
           ("core0_busy", "core 0 busy (stand-in + client)"),
           ("events_per_piece", "events per piece read"),
           ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"),
           ("itl_p99_minus_direct_ms", "ITL p99 − direct ms"),
           ("delivery_gap_p99_ms", "gap between pieces p99 ms"),
           ("delivery_gap_p99_minus_direct_ms", "its p99 − direct ms"),
           ("bytes_sent", "bytes sent"), ("bytes_lost", "bytes lost"),
           ("streams_checked", "streams checked"), ("streams_failed", "streams failed"),
           ("rounds_events_per_s", "each round, events/s"),
           ("background_cores", "other load (cores)")]
BEFORE = [("path", "path"), ("streams", "streams"), ("events", "events/s before → after"),
          ("cpu", "worker CPU µs / event before → after"),
          ("itl", "ITL p99 ms before → after"),
          ("gap", "gap between pieces p99 ms before → after"),
          ("lost", "bytes lost before → after"), ("failed", "streams failed before → after")]


def _rows(section: dict[str, Any] | None, path: str) -> list[dict[str, Any]]:
    return sorted((r for r in section["rows"] if r["path"] == path),
                  key=lambda r: r["streams"]) if section else []


def targets(section: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The relay ceiling's targets: events/s per mode, every byte, CPU per event flat."""
    found: list[dict[str, Any]] = []

    def add(name: str, wanted: str, measured: str | None, met: bool | None) -> None:
        found.append({"target": name, "wanted": wanted, "measured": measured or "not run",
                      "met": met})

    for path in (BALANCED, QUEUE, LOCAL):
        rows = _rows(section, path)
        add(f"relay ceiling, {SHORT[path]}: events/s",
            f"at least {WANTED[path]:,} through one worker process, at every stream count",
            rows and ", ".join(f"{r['events_per_s']:,} ({r['streams']:,} streams)" for r in rows),
            rows and min(r["events_per_s"] for r in rows) >= WANTED[path])
    rows = section["rows"] if section else []
    lost = sum(r["bytes_lost"] for r in rows)
    failed = sum(r.get("streams_failed", 0) for r in rows)
    add("relay ceiling: every byte delivered",
        "0 bytes lost, every stream byte-identical to what the stand-in sent, none failed",
        rows and f"{lost:,} of {sum(r['bytes_sent'] for r in rows):,} bytes lost, "
                 f"{sum(r['streams_mismatched'] for r in rows)} of "
                 f"{sum(r['streams_checked'] for r in rows):,} streams differing, "
                 f"{failed} failed",
        lost == 0 and failed == 0 and all(r["streams_mismatched"] == 0 for r in rows)
        if rows else None)
    growth = {path: _growth(_rows(section, path)) for path in (QUEUE, LOCAL, BALANCED)}
    known = {path: g for path, g in growth.items() if g is not None}
    add("relay ceiling: CPU per event flat",
        f"at most {FLAT:g}x from the fewest streams to the most, every mode",
        known and ", ".join(f"{SHORT[path].split()[0]} {g:.2f}x" for path, g in known.items()),
        all(g <= FLAT for g in known.values()) if known else None)
    return found


def _growth(rows: list[dict[str, Any]]) -> float | None:
    if len(rows) < 2:
        return None
    return rows[-1]["worker_cpu_us_per_event"] / rows[0]["worker_cpu_us_per_event"]


def _short_of(section: dict[str, Any]) -> list[str]:
    """For each mode short of its events/s: what one process can do at the cost measured,
    and how many such processes the target takes."""
    notes = []
    for path in (BALANCED, QUEUE, LOCAL):
        for row in _rows(section, path):
            if row["events_per_s"] >= WANTED[path]:
                continue
            cost = row["worker_cpu_us_per_event"]
            full = row["worker_core_busy"] + row["worker_waited_for_cpu"]
            needed = math.ceil(WANTED[path] * cost / 1e6)
            line = (f"- {SHORT[path]}, {row['streams']:,} streams: {row['events_per_s']:,} "
                    f"events/s at {cost:g} µs of the worker's CPU per event; at that cost one "
                    f"core relays at most {1e6 / cost:,.0f} events/s, so "
                    + (f"one process would reach {WANTED[path]:,} with a core of its own, full"
                       if needed <= 1 else
                       f"{WANTED[path]:,} takes {needed} such processes, each on a core of "
                       "its own"))
            if full < FULL_CORE:
                line += (f". The worker's core was not full (busy {row['worker_core_busy']:g}, "
                         f"waiting for a CPU {row['worker_waited_for_cpu']:g}) and core 0 "
                         f"(the stand-in and the client) was {row['core0_busy']:g} busy: "
                         + ("the rig set this pace, not the worker"
                            if row["core0_busy"] >= FULL_CORE else
                            "waiting, not CPU, set this pace (for the queue path: the SDK "
                            "takes, starts and posts each job's work one round trip at a "
                            "time)"))
            notes.append(line + ".")
    return notes


def _before(section: dict[str, Any]) -> list[dict[str, Any]]:
    note = section["before"]
    old = {(r["path"], r["streams"]): r for r in note["rows"]}
    rows = []
    for new in section["rows"]:
        was = old.get((new["path"], new["streams"]))
        if was is None:
            continue

        def pair(key: str, digits: int = 0, *, w: dict[str, Any] = was,
                 n: dict[str, Any] = new) -> str:
            if w.get(key) is None or n.get(key) is None:
                return "-"
            return f"{w[key]:,.{digits}f} → {n[key]:,.{digits}f}"

        rows.append({"path": new["path"], "streams": new["streams"],
                     "events": pair("events_per_s"), "cpu": pair("worker_cpu_us_per_event", 1),
                     "itl": pair("itl_p99_ms", 2), "gap": pair("delivery_gap_p99_ms", 1),
                     "lost": pair("bytes_lost"), "failed": pair("streams_failed")})
    return rows


def render(section: dict[str, Any], table: Table) -> str:
    low, high = section["tokens_per_stream"]
    parts = [
        f"One worker process per mode on core {section['worker_core']} (taskset), alone there; "
        f"the stand-in vLLM on core {section['stand_in_core']}, and beside it this process: "
        "the client reading every stream (raw asyncio + httptools) and, for (a), the fake "
        "platform taking the stream posts. The client sits with the stand-in because there "
        "it takes nothing from the worker, whose core is the one meant to run out; core 0's "
        "load is in the table, and where it is full the stand-in, not the worker, set the "
        f"pace. Streams of {low} to {high} tokens (each slot starts its next stream when one "
        "ends; the first ends anywhere below, so they do not end together), written by the "
        "stand-in as fast as its core allows, one event per HTTP chunk and per write, as "
        f"vLLM writes them; {section['warmup_s']:g} s to start, then {section['seconds']:g} s "
        f"counted, {section['rounds']} rounds with the paths in rotating order, medians "
        f"shown. Commit {section.get('commit', '?')}. Events: every SSE event (a stream of n "
        "tokens has n + 3: role chunk, usage chunk, `[DONE]`). Worker CPU: utime + stime "
        "of the worker's process (/proc/PID/stat) over the counted window, per event "
        "relayed; \"waited for a CPU\": the time it was runnable but another process had "
        "its core (/proc/PID/schedstat). ITL: the gap between a stream's consecutive events "
        "as the client reads them (events that come in one piece: 0, as `vllm bench serve` "
        "counts them), p99 − direct against the same round's direct run; when a relay hands "
        "over dozens of events at a time, over 99% of them come with no gap, and the gap "
        "between pieces (the same without those zeros: how long a stream's reader waits for "
        "its next delivery) is the figure that shows the wait. "
        "Bytes: every stream's bytes and SHA-256 as the client received them against the "
        "stand-in's digest of what it wrote (`bench_digest`); a stream that differs at all "
        "counts as lost whole, and the scenario fails.",
        table(section["rows"], COLUMNS)]
    if notes := _short_of(section):
        parts.append("Where one process falls short of its target, what would reach it "
                     "(measured cost, not built; for the two HTTP servers, several relay "
                     "processes accepting on one port with SO_REUSEPORT; for the queue path, "
                     "the Runpod SDK runs every job in one process):\n\n" + "\n".join(notes))
    if section.get("before"):
        note = section["before"]
        rows = _before(section)
        parts.append(f"Before the pool to vLLM moved to aiohttp's transport (commit "
                     f"{note.get('commit')}, httpx's own transport, measured "
                     f"{note.get('measured')}), the same scenario, the same way:\n\n"
                     + table(rows, BEFORE))
    return "\n\n".join(parts)
