"""A vLLM config file (VLLM_CONFIG_FILE) is read as vLLM reads it and checked before spawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings.config_file import config_flags
from worker.settings.table import SettingsError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vllm.yaml"
    path.write_text(text)
    return str(path)


def test_each_key_becomes_the_flag_vllm_reads_it_as(tmp_path: Path) -> None:
    path = write(tmp_path, "max-num-seqs: 32\nenable_prefix_caching: false\n"
                           "speculative-config: {method: ngram, num_speculative_tokens: 3}\n")
    found = config_flags(path, "VLLM_CONFIG_FILE")
    assert {flag: arg.argv for flag, arg in found.items()} == {
        "--max-num-seqs": ("--max-num-seqs", "32"),
        "--enable-prefix-caching": ("--no-enable-prefix-caching",),
        "--speculative-config": ("--speculative-config",
                                 '{"method": "ngram", "num_speculative_tokens": 3}')}
    assert found["--max-num-seqs"].source == f"{path} (max-num-seqs)"


@pytest.mark.parametrize(("text", "words"), [
    ("max-num-seqs: lots\n", "max-num-seqs in"),
    ("kv-cache-dtype: fp9\n", "one of auto"),
    ("no-such-option: 1\n", "'no-such-option', which is not an option of vLLM's"),
    ("- a list\n", "must be a YAML mapping"),
    ("max-num-seqs: [unclosed\n", "is not valid YAML"),
])
def test_what_vllm_would_refuse_stops_the_start_naming_the_file_and_key(
        tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(SettingsError) as refused:
        config_flags(write(tmp_path, text), "VLLM_CONFIG_FILE")
    assert words in str(refused.value)


def test_a_missing_file_is_named_with_its_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="VLLM_CONFIG_FILE=/nope.yaml cannot be read"):
        config_flags("/nope.yaml", "VLLM_CONFIG_FILE")
