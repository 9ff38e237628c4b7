"""Where a vLLM's start-up time went, read from its own log lines as they come.

vLLM logs each phase of its start: the weights loaded, torch.compile (or its cache
loaded), CUDA graphs captured, the KV cache sized, the engine initialised. `Timeline`
reads those lines (`feed`, from the child's output pump), times each phase by when
its line arrived, and `summary()` gives one line for the log (and a dict for the
diagnostic's JSON). The patterns are data (`PATTERNS`): a line vLLM words differently
leaves its phase unknown, and nothing here ever raises into the pump.

The same lines list the routes vLLM's server mounted for its model (`Route: /v1/...,
Methods: POST`); `routes()` gives them the moment vLLM is healthy. Asking its
`/openapi.json` instead costs a cold start over a second: vLLM builds that schema on the
first request.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

log = logging.getLogger("worker.timeline")
_NUMBER = r"([\d,]+(?:\.\d+)?)"
# Phase -> the log lines that mark its end, with the figure each carries.
PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "weights": (re.compile(rf"Loading weights took {_NUMBER} s"),
                re.compile(rf"Model loading took {_NUMBER} GiB memory and {_NUMBER} s")),
    "compile_hit": (re.compile(r"Directly load (?:AOT compilation|the compiled graph)"),),
    # A cache entry for this key that vLLM could not load: it compiles again, reusing the
    # kernels of that entry it can (vLLM 0.32's CPU build always ends here).
    "compile_unloadable": (re.compile(r"Compiling model again due to a load failure"),),
    "compile_miss": (re.compile(r"saved AOT compiled function|torch\.compile takes"
                                r"|Compiling a graph for"),),
    "graphs": (re.compile(rf"Graph capturing finished in {_NUMBER} sec"),),
    "kv_cache": (re.compile(rf"KV cache size: {_NUMBER} tokens"),),
    "engine": (re.compile(rf"init engine \(profile, create kv cache, warmup model\) took "
                          rf"{_NUMBER} s"),),
    "compile_start": (re.compile(r"Warming up model for the compilation|Start compiling"
                                 r"|Dynamo bytecode transform time"),),
}


ROUTE = re.compile(r"\bRoute: (/\S*?),? Methods: ")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


class Timeline:
    """One vLLM's start-up, phase by phase; `feed` each of its lines as it arrives."""

    def __init__(self, name: str, weights_bytes: int | None = None,
                 located_in: float | None = None, downloaded: str = "") -> None:
        self.name = name
        self.weights_bytes = weights_bytes
        self.located_in = located_in
        self.downloaded = downloaded  # the download before it, when there was one
        self.spawned = time.monotonic()
        self.seen: dict[str, float] = {}  # phase -> when its line came, since spawned
        self.figures: dict[str, float] = {}
        self.healthy: float | None = None
        self._routes: set[str] = set()
        self._routes_listed = False
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        """Note the phase `line` ends or the route it lists, if any (never raises); once
        vLLM is healthy its start is over, and its lines are no longer read."""
        if self.healthy is not None:
            return
        try:
            if "Route: " in line and (route := ROUTE.search(line)):
                with self._lock:
                    self._routes.add(route.group(1))
                return
            self._routes_listed = bool(self._routes)  # a line after the list ends it
            at = time.monotonic() - self.spawned
            for phase, patterns in PATTERNS.items():
                for pattern in patterns:
                    if match := pattern.search(line):
                        with self._lock:
                            self.seen.setdefault(phase, at)
                            if match.groups() and phase not in self.figures:
                                self.figures[phase] = _number(match.groups()[-1])
                        return
        except Exception:  # a line must never break the pump that copies vLLM's output
            log.debug("could not read %r", line, exc_info=True)

    def routes(self) -> frozenset[str] | None:
        """The routes vLLM logged, or None when its log has not shown a whole list (a line
        after it) with `/v1/models` in it: then ask vLLM."""
        with self._lock:
            whole = self._routes_listed and "/v1/models" in self._routes
            return frozenset(self._routes) if whole else None

    def mark_healthy(self) -> None:
        self.healthy = time.monotonic() - self.spawned

    def phases(self) -> dict[str, Any]:
        """Each phase's figure (None when its line never came), as the JSON shows them."""
        with self._lock:
            seen, figures = dict(self.seen), dict(self.figures)
        compile_end = seen.get("compile_hit", seen.get("compile_miss"))
        compile_s = None
        if compile_end is not None:
            compile_s = round(compile_end - seen.get("compile_start", seen.get("weights", 0)),
                              1)
        weights_s = figures.get("weights")
        rate = (self.weights_bytes / weights_s / 1e9 if self.weights_bytes and weights_s
                else None)
        return {
            "locate_s": None if self.located_in is None else round(self.located_in, 3),
            "weights_s": weights_s,
            "weights_bytes": self.weights_bytes,
            "weights_gb_per_s": None if rate is None else round(rate, 2),
            "compile_s": compile_s,
            "compile_cache": ("hit" if "compile_hit" in seen else
                              "unloadable" if "compile_unloadable" in seen else
                              "miss" if "compile_miss" in seen else None),
            "graph_capture_s": figures.get("graphs"),
            "kv_cache_tokens": int(figures["kv_cache"]) if "kv_cache" in figures else None,
            "engine_init_s": figures.get("engine"),
            "healthy_s": None if self.healthy is None else round(self.healthy, 1),
        }

    def summary(self, overhead: float | None = None) -> str:
        """One line: where the time went (`?` for a phase vLLM's log did not show)."""
        p = self.phases()

        def s(value: Any, unit: str = " s") -> str:
            return "?" if value is None else f"{value:,}{unit}" if isinstance(value, int) \
                else f"{value:g}{unit}"

        size = "" if not p["weights_bytes"] else (
            f" ({_size(p['weights_bytes'])}, {s(p['weights_gb_per_s'], ' GB/s')})")
        located = "?" if self.located_in is None else (
            f"{self.located_in * 1000:.1f} ms" if self.located_in < 1 else
            f"{self.located_in:.1f} s")
        cache = f" (cache {p['compile_cache']})" if p["compile_cache"] else ""
        tail = "" if overhead is None else f"; the worker's own after it: {overhead:.2f} s"
        fetched = f"{self.downloaded}, " if self.downloaded else ""
        return (f"Start-up of {self.name}: {fetched}located in {located}, weights loaded in "
                f"{s(p['weights_s'])}{size}, compile {s(p['compile_s'])}{cache}, graph "
                f"capture {s(p['graph_capture_s'])}, KV cache {s(p['kv_cache_tokens'], ' tokens')}"
                f", engine init {s(p['engine_init_s'])}, healthy after {s(p['healthy_s'])}"
                f"{tail}")


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
