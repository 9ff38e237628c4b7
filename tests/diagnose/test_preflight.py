"""The checks run before vLLM starts, each a verdict with its reason (pure functions)."""

from __future__ import annotations

from worker.diagnose import preflight
from worker.settings.loader import load

GIB = 1 << 30


def test_memory_check_compares_the_weights_with_what_vllm_may_use() -> None:
    h100 = (80 * GIB, 79 * GIB)
    ok = preflight.check_memory(13 * GIB, [h100], 1, 0.95, None)
    assert ok.status == "ok" and "vLLM may use 76.0 GiB of 1 GPU(s)" in ok.detail
    too_big = preflight.check_memory(65 * GIB, [(24 * GIB, 23 * GIB)], 1, 0.95, None)
    assert too_big.status == "fail" and "weights 65.0 GiB" in too_big.detail
    assert preflight.check_memory(65 * GIB, [h100, h100], 2, 0.95, None).status == "ok"
    tight = preflight.check_memory(70 * GIB, [h100], 1, 0.95, None)
    assert tight.status == "warn" and "KV cache" in tight.detail
    busy = preflight.check_memory(13 * GIB, [(80 * GIB, 40 * GIB)], 1, 0.95, None)
    assert busy.status == "fail" and "something else uses it" in busy.detail
    no_gpu = preflight.check_memory(30 * GIB, None, 0, 0.95, 16 * GIB)
    assert no_gpu.status == "warn" and "16.0 GiB of RAM available" in no_gpu.detail
    assert preflight.check_memory(None, [h100], 1, 0.95, None).status == "ok"


def test_available_ram_is_read_from_meminfo() -> None:
    meminfo = "MemTotal:       24000000 kB\nMemAvailable:   16000000 kB\n"
    assert preflight.available_ram(meminfo) == 16_000_000 * 1024
    assert preflight.available_ram("MemTotal: 1 kB\n") is None


def test_gpu_count_and_tensor_parallel_size_are_checked() -> None:
    assert preflight.check_gpus(0, load({})).detail.startswith("0 GPUs visible")
    assert preflight.check_gpus(2, load({"TENSOR_PARALLEL_SIZE": "4"})).status == "fail"
    assert preflight.check_gpus(4, load({"TENSOR_PARALLEL_SIZE": "4"})).status == "ok"
