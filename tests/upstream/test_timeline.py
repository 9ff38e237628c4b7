"""The start-up timeline read from vLLM's own lines (as vLLM 0.32 writes them)."""

from __future__ import annotations

from worker.upstream.timeline import Timeline

CPU_START = [
    "(APIServer pid=6225) INFO 12-01 22:27:44 [api_utils.py:286] non-default args: {}",
    "(Worker pid=6324) INFO 12-01 22:28:06 [default_loader.py:501] Loading weights took 0.01 "
    "seconds",
    "(Worker pid=6324) INFO 12-01 22:28:07 [cpu_model_runner.py:87] Warming up model for the "
    "compilation...",
    "(Worker pid=6324) INFO 12-01 22:28:38 [decorators.py:743] [backbone] saved AOT compiled "
    "function to /c/torch_compile_cache/torch_aot_compile/b456/rank_0_0/model",
    "(EngineCore pid=6254) INFO 12-01 22:28:39 [kv_cache_utils.py:2327] CPU KV cache size: "
    "1,048,576 tokens, Maximum concurrency for 32,768 tokens per request: 32.00x",
    "(EngineCore pid=6254) INFO 12-01 22:28:40 [core.py:402] init engine (profile, create kv "
    "cache, warmup model) took 33.27 s",
]


def test_each_phase_is_read_from_its_line() -> None:
    timeline = Timeline("tiny-chat", weights_bytes=20_000_000, located_in=0.004)
    for line in CPU_START:
        timeline.feed(line)
    timeline.mark_healthy()
    phases = timeline.phases()
    assert phases["weights_s"] == 0.01 and phases["weights_gb_per_s"] == 2.0
    assert phases["compile_cache"] == "miss" and phases["compile_s"] is not None
    assert phases["kv_cache_tokens"] == 1_048_576
    assert phases["engine_init_s"] == 33.27 and phases["locate_s"] == 0.004
    assert phases["graph_capture_s"] is None, "no CUDA graphs on a CPU"
    summary = timeline.summary(0.25)
    assert summary.startswith("Start-up of tiny-chat: located in 4.0 ms, weights loaded in "
                              "0.01 s (20.0 MB, 2 GB/s), compile ")
    assert "(cache miss)" in summary and "KV cache 1,048,576 tokens" in summary
    assert "graph capture ?" in summary and summary.endswith("the worker's own after it: 0.25 s")


def test_lines_after_healthy_are_not_read() -> None:
    """Its start is over: vLLM's request log lines cost the pump no pattern matching."""
    timeline = Timeline("tiny-chat")
    timeline.feed(CPU_START[1])
    timeline.mark_healthy()
    before = timeline.phases()
    for line in CPU_START[2:]:
        timeline.feed(line)
    assert timeline.phases() == before and before["weights_s"] == 0.01
    assert before["kv_cache_tokens"] is None


def test_a_cache_hit_and_a_gpus_lines_are_read_too() -> None:
    timeline = Timeline("m")
    for line in ("Model loading took 12.5 GiB memory and 41.2 seconds",
                 "[backbone] Directly load AOT compilation from path /c/x",
                 "Graph capturing finished in 7 secs, took 0.4 GiB",
                 "GPU KV cache size: 123,456 tokens"):
        timeline.feed(line)
    phases = timeline.phases()
    assert (phases["weights_s"], phases["compile_cache"], phases["graph_capture_s"],
            phases["kv_cache_tokens"]) == (41.2, "hit", 7.0, 123_456)


def test_a_cache_entry_vllm_could_not_load_is_told_apart_from_a_miss() -> None:
    """vLLM 0.32's CPU build finds the entry, fails to load it and compiles again (reusing
    the entry's kernels), then saves it anew."""
    timeline = Timeline("m")
    for line in (CPU_START[2],
                 "(Worker pid=15314) WARNING 12-01 22:49:57 [decorators.py:333] [backbone] "
                 "Compiling model again due to a load failure from /c/rank_0_0/model, reason: "
                 "'function' object has no attribute 'finalize_loading'",
                 CPU_START[3]):
        timeline.feed(line)
    assert timeline.phases()["compile_cache"] == "unloadable"
    assert timeline.phases()["compile_s"] is not None
    assert "(cache unloadable)" in timeline.summary()


def test_lines_vllm_words_otherwise_leave_the_phase_unknown_and_never_raise() -> None:
    timeline = Timeline("m")
    for line in ("Weights were loaded quickly", "", "\x00\xff", "KV cache size: lots tokens"):
        timeline.feed(line)
    timeline.feed(None)  # type: ignore[arg-type]
    assert all(value is None for key, value in timeline.phases().items())


ROUTES = [
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:186] Available routes are:",
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:195] Route: /openapi.json, "
    "Methods: GET, HEAD",
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:195] Route: /health, Methods: GET",
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:195] Route: /v1/models, Methods: GET",
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:195] Route: "
    "/v1/responses/{response_id}, Methods: GET",
    "(APIServer pid=13528) INFO 12-02 02:35:10 [launcher.py:195] Route: /v1/chat/completions, "
    "Methods: POST",
]


def test_the_routes_vllm_lists_are_known_once_the_list_has_ended() -> None:
    timeline = Timeline("tiny-chat")
    for line in ROUTES:
        timeline.feed(line)
    assert timeline.routes() is None, "the list may go on: ask vLLM rather than guess"
    timeline.feed("INFO:     Started server process [13528]")
    assert timeline.routes() == {"/openapi.json", "/health", "/v1/models",
                                 "/v1/responses/{response_id}", "/v1/chat/completions"}


def test_a_log_without_the_route_list_leaves_the_routes_to_ask_for() -> None:
    timeline = Timeline("tiny-chat")
    for line in [*CPU_START, "INFO:     Started server process [13528]"]:
        timeline.feed(line)
    assert timeline.routes() is None
