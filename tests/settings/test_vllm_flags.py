"""vLLM's flags as data: the stored list is the pinned vLLM's, and each variable becomes
the argv vLLM's own parser takes (or a sentence saying what it accepts)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support.real_vllm import REPO, real_vllm_python
from worker.settings.vllm_flags import (
    BY_VARIABLE,
    DATA,
    FLAGS,
    OWNED,
    VLLM_VERSION,
    FlagError,
    flag_argv,
    known_flag,
)


def argv(variable: str, value: str) -> list[str]:
    return flag_argv(BY_VARIABLE[variable], variable, value)


def test_the_stored_flags_are_those_of_the_pinned_vllm(tmp_path: Path) -> None:
    """A vLLM upgrade fails here, listing what came, went or changed: regenerate with
    `.venv-vllm/bin/python tools/gen_vllm_flags.py` and review the diff."""
    fresh = tmp_path / "flags.json"
    done = subprocess.run([real_vllm_python(), str(REPO / "tools" / "gen_vllm_flags.py"),
                           str(fresh)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stored, generated = json.loads(DATA.read_text()), json.loads(fresh.read_text())
    assert generated["vllm"] == stored["vllm"] == VLLM_VERSION
    old = {f["flag"]: f for f in stored["flags"]}
    new = {f["flag"]: f for f in generated["flags"]}
    assert sorted(set(new) - set(old)) == [], "flags the pinned vLLM added"
    assert sorted(set(old) - set(new)) == [], "flags the pinned vLLM removed"
    assert [f for f in new if new[f] != old[f]] == [], "flags that changed"


def test_the_pinned_version_is_the_makefiles() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert f"VLLM_VERSION := {VLLM_VERSION}\n" in makefile


def test_value_flags_get_their_value_checked_for_type_and_choices() -> None:
    assert argv("MAX_NUM_SEQS", "64") == ["--max-num-seqs", "64"]
    assert argv("MAX_NUM_BATCHED_TOKENS", "16k") == ["--max-num-batched-tokens", "16k"]
    assert argv("KV_CACHE_DTYPE", "fp8") == ["--kv-cache-dtype", "fp8"]
    assert argv("SPECULATIVE_CONFIG", '{"method": "ngram"}') == [
        "--speculative-config", '{"method": "ngram"}']
    assert argv("GPU_MEMORY_UTILIZATION", "0.5") == ["--gpu-memory-utilization", "0.5"]
    assert argv("MAX_LORA_RANK", "64") == ["--max-lora-rank", "64"]


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("MAX_NUM_SEQS", "lots", "it must be a whole number"),
    ("MAX_NUM_BATCHED_TOKENS", "8x", "(1k, 2M"),
    ("KV_CACHE_DTYPE", "fp9", "one of auto, bfloat16"),
    ("MAX_LORA_RANK", "7", "one of 1, 8, 16"),
    ("SPECULATIVE_CONFIG", "{not json", "a JSON object"),
    ("SPECULATIVE_CONFIG", "[1, 2]", "a JSON object"),
    ("ENFORCE_EAGER", "maybe", "true or false"),
    ("CPU_OFFLOAD_GB", "nan", "a number"),
])
def test_a_value_vllm_would_refuse_names_the_variable_the_value_and_what_it_takes(
        variable: str, value: str, words: str) -> None:
    with pytest.raises(FlagError) as refused:
        argv(variable, value)
    message = str(refused.value)
    assert message.startswith(f"{variable}={value!r} is not valid") and words in message


def test_switches_get_their_pair_form_and_bare_flags_are_given_or_left_out() -> None:
    assert argv("ENABLE_PREFIX_CACHING", "false") == ["--no-enable-prefix-caching"]
    assert argv("ENABLE_PREFIX_CACHING", "True") == ["--enable-prefix-caching"]
    assert argv("ENFORCE_EAGER", "1") == ["--enforce-eager"]
    assert argv("DISABLE_LOG_STATS", "true") == ["--disable-log-stats"]
    assert argv("DISABLE_LOG_STATS", "False") == []


@pytest.mark.parametrize("value", ["", "  ", "auto", "None", "none", "AUTO"])
def test_auto_none_and_empty_let_vllm_decide(value: str) -> None:
    assert argv("QUANTIZATION", value) == []
    assert argv("TRUST_REMOTE_CODE", value) == []


def test_zero_batched_tokens_from_worker_vllm_templates_lets_vllm_decide() -> None:
    assert argv("MAX_NUM_BATCHED_TOKENS", "0") == []
    assert argv("SEED", "0") == ["--seed", "0"], "a real 0 elsewhere"


def test_several_values_are_split_like_a_shell_and_each_checked() -> None:
    assert argv("CUDAGRAPH_CAPTURE_SIZES", "1 2 4") == ["--cudagraph-capture-sizes", "1", "2",
                                                        "4"]
    with pytest.raises(FlagError, match="'x' is not valid"):
        argv("CUDAGRAPH_CAPTURE_SIZES", "1 x")


def test_the_worker_owns_where_vllm_listens_what_it_serves_and_its_secrets() -> None:
    for name in ("HOST", "PORT", "MODEL", "SERVED_MODEL_NAME", "API_KEY", "HF_TOKEN",
                 "ROOT_PATH", "MASTER_ADDR", "CONFIG"):
        assert name in OWNED and name not in BY_VARIABLE
    assert {f.variable for f in FLAGS.values()} - set(BY_VARIABLE) == OWNED & {
        f.variable for f in FLAGS.values()}


def test_argv_items_name_flags_as_argparse_reads_them() -> None:
    assert known_flag("--max-num-seqs=8") is FLAGS["--max-num-seqs"]
    assert known_flag("--no-enforce-eager") is FLAGS["--enforce-eager"]
    assert known_flag("--max-num-se") is FLAGS["--max-num-seqs"], "a unique prefix"
    assert known_flag("--max") is None, "ambiguous"
    assert known_flag("--no-seed") is None, "not a switch"
