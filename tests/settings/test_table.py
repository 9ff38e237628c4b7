"""The settings table: each row's reader and the README table it makes."""

from __future__ import annotations

import pytest

from worker.masking import is_secret_name
from worker.settings.table import BY_NAME, SETTINGS, SettingsError, markdown_table


def read(name: str, raw: str) -> object:
    return BY_NAME[name].read(name, raw)


def test_every_setting_is_declared_once_with_a_doc_line() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.doc.endswith(".") and "\n" not in s.doc for s in SETTINGS)


def test_every_default_is_a_value_its_reader_accepts() -> None:
    for setting in SETTINGS:
        if setting.default is not None:
            setting.read(setting.name, setting.default)


def test_secret_settings_are_those_the_masking_rule_finds() -> None:
    assert {s.name for s in SETTINGS if s.secret} == {s.name for s in SETTINGS
                                                       if is_secret_name(s.name)}


def test_contexts_read_as_vllm_reads_them_and_auto_leaves_them_to_vllm() -> None:
    assert read("MAX_MODEL_LEN", "32768") == 32768
    assert read("MAX_MODEL_LEN", "32k") == 32000
    assert read("MAX_MODEL_LEN", "32K") == 32768
    assert read("MAX_MODEL_LEN", "auto") is None
    with pytest.raises(SettingsError, match="MAX_MODEL_LEN='-3' is not valid"):
        read("MAX_MODEL_LEN", "-3")


def test_choices_come_from_the_pinned_vllm() -> None:
    assert read("DTYPE", "float16") == "float16"
    assert read("DTYPE", "auto") is None
    with pytest.raises(SettingsError, match="one of auto, bfloat16"):
        read("DTYPE", "bf16")
    with pytest.raises(SettingsError, match="CONVERT='reward'"):
        read("CONVERT", "reward")


def test_the_markdown_table_has_a_row_per_setting_with_its_default() -> None:
    table = markdown_table().splitlines()
    assert table[0] == "| Variable | Default | Meaning |" and len(table) == len(SETTINGS) + 2
    assert "| `MAX_CONCURRENCY` | `30` | Jobs one worker runs at once" in markdown_table()
    assert "| `TENSOR_PARALLEL_SIZE` | every visible GPU |" in markdown_table()
