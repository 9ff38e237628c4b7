"""The vocabulary verdicts share: settings named as the user sets them, vLLM's text quoted
short and masked. (judge() on real output is in test_verdicts.py.)"""

from __future__ import annotations

import pytest

from worker.upstream.verdict_words import (
    Facts,
    capability,
    choices,
    mask,
    model,
    more_gpus,
    quote,
    set_by,
)


@pytest.mark.parametrize(("flag", "variable", "where"), [
    ("--kv-cache-dtype", "KV_CACHE_DTYPE", "set by KV_CACHE_DTYPE or VLLM_EXTRA_ARGS"),
    ("--revision", "MODEL_REVISION", "set by MODEL_REVISION or VLLM_EXTRA_ARGS"),
    ("--chat-template", "CUSTOM_CHAT_TEMPLATE", "set by CUSTOM_CHAT_TEMPLATE or VLLM_EXTRA_ARGS"),
    ("--no-enable-chunked-prefill", "ENABLE_CHUNKED_PREFILL",
     "set by ENABLE_CHUNKED_PREFILL or VLLM_EXTRA_ARGS"),
    ("--port", "--port", "the worker sets it itself: remove it from VLLM_EXTRA_ARGS"),
    ("--not-a-flag", "--not-a-flag", "in VLLM_EXTRA_ARGS"),
])
def test_a_flag_is_named_by_the_variable_that_sets_it(flag: str, variable: str,
                                                       where: str) -> None:
    assert set_by(flag) == (variable, where)


def test_the_model_is_named_by_its_variable() -> None:
    assert model(Facts("Qwen/Qwen3-8B")) == "MODEL_NAME=Qwen/Qwen3-8B"
    assert model(Facts("/runpod-volume/m")) == "MODEL_PATH=/runpod-volume/m"
    assert model(Facts("org/m"), "org/m/") == "MODEL_NAME=org/m"
    assert model(Facts("org/m"), "org/tokenizer") == "org/tokenizer", "another repo, as vLLM says"


def test_quoted_text_is_one_short_line() -> None:
    assert quote("a\n  b\tc") == "a b c"
    cut = quote("x" * 500, 50)
    assert len(cut) == 50 and cut.endswith("…")


@pytest.mark.parametrize(("text", "shown"), [
    ("token hf_AbCdEfGhIjKlMnOpQrSt12 here", "token hf_*** here"),
    ("url?token=s3cr3t&x", "url?token=*** "),
    ("HF_TOKEN=abc123456 set", "HF_TOKEN=*** set"),
    ("api_key: abc123", "api_key: ***"),
    # Ordinary settings that merely name tokens stay as they are.
    ("MAX_NUM_BATCHED_TOKENS=1024, DEFAULT_MAX_TOKENS=512", None),
])
def test_secrets_are_masked_and_settings_are_not(text: str, shown: str | None) -> None:
    masked = mask(text)
    if shown is None:
        assert masked == text
    else:
        assert masked.startswith(shown.rstrip()) and "s3cr3t" not in masked
        assert "abc123" not in masked and "AbCdEf" not in masked


def test_more_gpus_names_what_this_worker_has() -> None:
    assert more_gpus(Facts("m", gpus=4, tensor_parallel_size=1)).startswith(
        "TENSOR_PARALLEL_SIZE=4 to split it over this worker's 4 GPUs")
    assert more_gpus(Facts("m", gpus=1)).endswith("set to their number, now 1")
    assert more_gpus(Facts("m")).endswith("set to their number")


def test_vllm_figures_are_written_as_people_read_them() -> None:
    assert capability("89") == "8.9" and capability("120") == "12.0"
    assert choices("'auto', 'half'") == "auto, half"
    assert choices(" apertus,hermes ") == "apertus, hermes"
