"""Misspelt settings get a warning naming the setting meant; the system's names none."""

from __future__ import annotations

from worker.settings.misspellings import closest, distance, near_misses


def test_distance_counts_edits_and_stops_above_the_limit() -> None:
    assert distance("ENABLE_PREFIX_CACHNG", "ENABLE_PREFIX_CACHING", 2) == 1
    assert distance("MAX_NUM_SEQ", "MAX_NUM_SEQS", 2) == 1
    assert distance("abc", "xyzuvw", 2) == 3


def test_a_name_one_or_two_letters_from_a_setting_is_named_with_it() -> None:
    warnings = list(near_misses({"ENABLE_PREFIX_CACHNG": "true", "MAX_MODEL_LN": "4096",
                                 "TENSR_PARALLEL_SIZE": "2", "MAX_NUM_SEQS": "8"}))
    assert warnings == [
        "ENABLE_PREFIX_CACHNG is not a setting: did you mean ENABLE_PREFIX_CACHING? It is "
        "ignored.",
        "MAX_MODEL_LN is not a setting: did you mean MAX_MODEL_LEN? It is ignored.",
        "TENSR_PARALLEL_SIZE is not a setting: did you mean TENSOR_PARALLEL_SIZE? It is "
        "ignored."]


def test_the_platforms_and_the_systems_variables_are_nobodys_typo() -> None:
    env = {"PATH": "/bin", "HOME": "/root", "HOSTNAME": "x", "RUNPOD_POD_ID": "p",
           "RUNPOD_GPU_COUNT": "1", "CUDA_VERSION": "13.0", "NVIDIA_VISIBLE_DEVICES": "all",
           "PYTHONUNBUFFERED": "1", "LD_LIBRARY_PATH": "/usr/lib", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTORCH_ALLOC_CONF": "expandable_segments:True", "HF_HUB_OFFLINE": "1"}
    assert list(near_misses(env)) == []
    assert closest("QUANTISATION", ["QUANTIZATION"]) == "QUANTIZATION"
    assert closest("QUANTIZATION", ["QUANTIZATION"]) is None, "itself is no suggestion"
