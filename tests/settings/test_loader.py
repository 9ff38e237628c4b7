"""Settings: defaults, validation that names the variable, secrets collected for masking."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.diagnose.report import setting_names
from worker.settings.loader import DEFAULTS, SettingsError, load
from worker.settings.table import markdown_table


def test_defaults_match_the_documented_table() -> None:
    settings = load({})
    assert settings.model_name == DEFAULTS["MODEL_NAME"] == "openai/gpt-oss-120b"
    assert settings.hf_home == "/runpod-volume/huggingface"
    (model,) = settings.models
    assert model.gpu_memory_utilization == 0.95 and model.port == 8000
    assert model.max_model_len == 8192 and model.max_model_len_is_default
    assert (model.runner, model.convert) == (None, None)
    assert settings.dtype == "bfloat16"
    assert settings.vllm_port == 8000
    assert settings.use_vllm_serve is False
    assert settings.tensor_parallel_size is None
    assert settings.enable_auto_tool_choice is None and settings.tool_call_parser is None
    assert settings.upstream_url == "http://127.0.0.1:8000"
    assert settings.hub_caches == ("/runpod-volume/huggingface/hub",
                                   "/runpod-volume/huggingface-cache/hub")


def test_empty_values_count_as_unset() -> None:
    assert load({"MAX_MODEL_LEN": "", "MODEL_NAME": "  "}).models[0].max_model_len == 8192
    assert load({"MODEL_NAME": ""}).model_name == "openai/gpt-oss-120b"


@pytest.mark.parametrize(("env", "words"), [
    ({"GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION='1.5' is not valid"),
    ({"GPU_MEMORY_UTILIZATION": "0"}, "a fraction in (0, 1]"),
    ({"GPU_MEMORY_UTILIZATION": "lots"}, "GPU_MEMORY_UTILIZATION"),
    ({"MAX_MODEL_LEN": "8x"}, "MAX_MODEL_LEN='8x' is not valid: it must be a whole number"),
    ({"VLLM_PORT": "70000"}, "VLLM_PORT"),
    ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY"),
    ({"TENSOR_PARALLEL_SIZE": "-2"}, "TENSOR_PARALLEL_SIZE"),
    ({"VLLM_STARTUP_TIMEOUT": "soon"}, "VLLM_STARTUP_TIMEOUT"),
    ({"REQUEST_TIMEOUT": "inf"}, "REQUEST_TIMEOUT"),
    ({"USE_VLLM_SERVE": "maybe"}, "USE_VLLM_SERVE='maybe' is not valid: it must be true or false"),
    ({"STREAM_FLUSH_INTERVAL": "0.5"}, "STREAM_FLUSH_INTERVAL"),
    ({"DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "0.5"}, "DEFAULT_BATCH_SIZE_GROWTH_FACTOR"),
    ({"VLLM_EXTRA_ARGS": "--x 'unclosed"}, "VLLM_EXTRA_ARGS cannot be split"),
    ({"VLLM_BASE_URL": "localhost:8000"}, "VLLM_BASE_URL"),
])
def test_invalid_values_fail_with_a_sentence_naming_the_variable(
        env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError) as failure:
        load(env)
    assert words in str(failure.value)


def test_values_are_parsed() -> None:
    settings = load({"USE_VLLM_SERVE": "YES", "ENABLE_AUTO_TOOL_CHOICE": "1",
                     "TOOL_CALL_PARSER": "hermes", "VLLM_EXTRA_ARGS": "--seed 1 --x 'a b'",
                     "TENSOR_PARALLEL_SIZE": "2", "HF_HUB_CACHE": "/cache/hub",
                     "VLLM_BASE_URL": "http://10.0.0.2:9000/"})
    assert settings.use_vllm_serve is True and settings.enable_auto_tool_choice is True
    assert settings.vllm_extra_args == ("--seed", "1", "--x", "a b")
    assert settings.tensor_parallel_size == 2
    assert "/cache/hub" in settings.hub_caches
    assert settings.upstream_url == "http://10.0.0.2:9000"


def test_several_models_share_the_gpu_and_get_consecutive_ports() -> None:
    settings = load({"MODEL_NAMES": " Qwen/Qwen3-8B ; BAAI/bge-m3 ;", "VLLM_PORT": "8100"})
    assert [m.name for m in settings.models] == ["Qwen/Qwen3-8B", "BAAI/bge-m3"]
    assert [m.served_name for m in settings.models] == ["Qwen/Qwen3-8B", "BAAI/bge-m3"]
    assert [m.port for m in settings.models] == [8100, 8101]
    assert [m.gpu_memory_utilization for m in settings.models] == [0.475, 0.475]
    listed = load({"MODEL_NAMES": "a/x;b/y", "GPU_MEMORY_UTILIZATION": "0.7;0.2",
                   "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "chat;embed"})
    assert [m.gpu_memory_utilization for m in listed.models] == [0.7, 0.2]
    assert [m.served_name for m in listed.models] == ["chat", "embed"]


@pytest.mark.parametrize(("env", "words"), [
    ({"MODEL_NAMES": "a/x;b/y", "GPU_MEMORY_UTILIZATION": "0.7;0.5"}, "add up to more than 1"),
    ({"MODEL_NAMES": "a/x;b/y", "MAX_MODEL_LEN": "1;2;3"}, "3 values for 2 models"),
    ({"MODEL_NAMES": "a/x;b/y", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "one"}, "one per model"),
    ({"MODEL_NAMES": "a/x;a/x"}, "the same name"),
    ({"MODEL_NAMES": "a/x;b/y", "MODEL_PATH": "/m"}, "MODEL_PATH serves one model"),
    ({"MODEL_NAMES": "a/x;b/y", "VLLM_BASE_URL": "http://h:1"}, "cannot be combined"),
    ({"MODEL_NAMES": "a/x;b/y", "RUNNER": "a;b;c"}, "RUNNER has 3 values"),
])
def test_bad_model_lists_fail_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(words)):
        load(env)


def test_tool_settings_tell_unset_from_switched_off() -> None:
    unset = load({})
    assert (unset.enable_auto_tool_choice, unset.tool_call_parser, unset.reasoning_parser) == (
        None, None, None)
    off = load({"ENABLE_AUTO_TOOL_CHOICE": "false", "TOOL_CALL_PARSER": "off",
                "REASONING_PARSER": "none"})
    assert (off.enable_auto_tool_choice, off.tool_call_parser, off.reasoning_parser) == (
        False, "", "")
    auto = load({"ENABLE_AUTO_TOOL_CHOICE": "auto", "TOOL_CALL_PARSER": "",
                 "REASONING_PARSER": " auto "})
    assert (auto.enable_auto_tool_choice, auto.tool_call_parser, auto.reasoning_parser) == (
        None, None, None)
    on = load({"ENABLE_AUTO_TOOL_CHOICE": "on", "TOOL_CALL_PARSER": "hermes"})
    assert (on.enable_auto_tool_choice, on.tool_call_parser) == (True, "hermes")


def test_served_name_is_the_override_else_the_model_name() -> None:
    assert load({"MODEL_NAME": "Qwen/Qwen3-8B"}).served_model_name == "Qwen/Qwen3-8B"
    assert load({"MODEL_NAME": "Qwen/Qwen3-8B", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "qwen"}
                ).served_model_name == "qwen"
    assert load({"MODEL_PATH": "/models/my-llama/"}).served_model_name == "my-llama"
    assert load({"MODEL_PATH": "/models/x", "MODEL_NAME": "org/x"}).served_model_name == "org/x"


def test_secret_values_are_collected_for_masking() -> None:
    settings = load({"HF_TOKEN": "hf_abcdefgh", "MY_API_KEY": "sk-123456", "PATH": "/bin",
                     "SHORT_TOKEN": "ab"})
    assert set(settings.secrets) == {"hf_abcdefgh", "sk-123456"}


def test_values_of_secret_flags_in_extra_args_are_secrets_too() -> None:
    """vLLM quotes its argv in some errors: `--api-key VALUE` must be masked like HF_TOKEN."""
    env = {"VLLM_EXTRA_ARGS": "--api-key sk-abcdef --hf-token=hf_xyzxyz --seed 1234"}
    assert set(load(env).secrets) == {"sk-abcdef", "hf_xyzxyz"}


@pytest.mark.parametrize("extra", ["--host 0.0.0.0", "--seed 1 --host=0.0.0.0", "--hos ::"])
def test_extra_args_may_not_move_vllm_off_loopback(extra: str) -> None:
    with pytest.raises(SettingsError, match="VLLM_EXTRA_ARGS must not set --host"):
        load({"VLLM_EXTRA_ARGS": extra})


def readme_settings_table() -> dict[str, str]:
    """Variable -> default cell of the README's settings table."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| Variable | Default | Meaning |"):].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        names, default = line.split("|")[1:3]
        for name in re.findall(r"`([A-Z_]+)`", names):
            rows[name] = default.strip()
    return rows


def test_the_readme_settings_table_lists_every_setting_with_the_codes_default() -> None:
    documented = readme_settings_table()
    assert set(setting_names()) - set(documented) == set(), "settings missing from the README"
    for name, default in DEFAULTS.items():
        assert documented[name] == f"`{default}`", name


def test_the_readme_settings_table_is_the_one_the_table_makes() -> None:
    """Run `python tools/readme_settings.py` after changing settings_table.py."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme


@pytest.mark.parametrize(("variable", "value", "flag"), [
    ("QUANTIZATION", "bogus-quant", "--quantization"), ("LOAD_FORMAT", "bogus", "--load-format"),
    ("KV_CACHE_DTYPE", "fp9", "--kv-cache-dtype")])
def test_values_vllm_checks_only_once_started_are_refused_before_the_spawn(
        variable: str, value: str, flag: str) -> None:
    """vLLM's parser takes any text for these; its config refuses a wrong one seconds to
    minutes later: the pinned vLLM's own lists refuse it at once, naming what is valid."""
    with pytest.raises(SettingsError, match=f"{variable}='{value}' is not valid for {flag}: "
                                            "it must be one of "):
        load({variable: value})
    assert load({"QUANTIZATION": "awq", "LOAD_FORMAT": "safetensors"}).flag_value(
        "--quantization") == "awq"
