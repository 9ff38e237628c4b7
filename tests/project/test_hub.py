"""The Runpod Hub metadata (.runpod/hub.json, .runpod/tests.json) against the worker's code.

hub.json is the documented table of the settings a Hub user can fill in: its names,
types, defaults and descriptions. These tests keep it from drifting from
`settings.load`: every variable the worker reads is listed or deliberately left out
(with the reason below), and no default or empty field changes what the worker does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.diagnose.report import setting_names
from worker.requests.contract import resolve
from worker.requests.relay import Pacing
from worker.settings.loader import DEFAULTS, SettingsError, load
from worker.settings.vllm_flags import ALIASES, BY_VARIABLE
from worker.upstream.target import Target

RUNPOD = Path(__file__).resolve().parents[2] / ".runpod"
HUB: dict[str, Any] = json.loads((RUNPOD / "hub.json").read_text())
TESTS: dict[str, Any] = json.loads((RUNPOD / "tests.json").read_text())
INPUTS: dict[str, dict[str, Any]] = {e["key"]: e["input"] for e in HUB["config"]["env"]}
# Read by the worker but not offered on the Hub form, and why.
LEFT_OUT = {
    "VLLM_PORT": "vLLM's loopback port inside the worker: nothing for a user to choose",
    "VLLM_PYTHON": "the image sets it to the interpreter that has vLLM",
    "VLLM_BASE_URL": "an external vLLM server: not what a Hub deployment runs",
    "LOCAL_API_KEY": "the local endpoint's key (local_endpoint.py), not used on Runpod",
    "LOCAL_MAX_BODY_MB": "the local endpoint's body limit, not used on Runpod",
    "HF_HUB_CACHE": "huggingface_hub's own cache override; HF_HOME is the one to set",
    "HUGGINGFACE_HUB_CACHE": "the older spelling of HF_HUB_CACHE",
    "BASE_PATH": "worker-vllm's storage folder, read for those who come with it; HF_HOME "
                 "is this worker's",
    "PORT": "load-balancing endpoints only, set with the port they expose; the Hub listing "
            "deploys a queue endpoint",
    "PORT_HEALTH": "the same",
    "API_KEY": "for the image run outside Runpod, which checks its own key",
    "VLLM_CACHE_ROOT": "vLLM's own cache variable, for those who set it already; "
                       "COMPILE_CACHE_ON_VOLUME is the switch offered",
}
# Besides the worker's own settings, the Hub form may offer any vLLM flag by its variable.
FLAG_VARIABLES = set(BY_VARIABLE) | set(ALIASES)
# What users set next to the Hub form's fields: defaults must change none of these.
SCENARIOS: list[dict[str, str]] = [
    {},
    {"MODEL_PATH": "/runpod-volume/models/my-model"},
    {"MODEL_NAME": "Qwen/Qwen3-8B", "MAX_MODEL_LEN": "16384"},
]


def env_value(field: dict[str, Any], value: Any) -> str:
    """The variable's text when the Hub form holds `value`."""
    if field["type"] == "boolean":
        return str(field["trueValue"] if value else field["falseValue"])
    return str(value)


def test_hub_json_has_what_the_hub_requires() -> None:
    assert HUB["title"] and HUB["description"]
    assert HUB["type"] == "serverless"
    assert HUB["category"] in {"audio", "embedding", "language", "video", "image"}
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and isinstance(config["containerDiskInGb"], int)
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    assert all(pool.strip() for pool in config["gpuIds"].split(","))
    for entry in config["env"]:
        assert set(entry) == {"key", "input"}, entry
        assert {"name", "type", "description"} <= set(entry["input"]), entry
        assert entry["input"]["type"] in {"string", "number", "boolean"}, entry


def test_every_setting_the_worker_reads_is_listed_or_left_out_for_a_reason() -> None:
    read = set(setting_names())
    listed = set(INPUTS)
    unknown = listed - read - FLAG_VARIABLES
    assert not unknown, f"hub.json lists variables the worker does not read: {unknown}"
    missing = read - listed - set(LEFT_OUT)
    assert not missing, f"settings missing from hub.json (or from LEFT_OUT here): {missing}"
    assert not set(LEFT_OUT) - read, "LEFT_OUT names variables the worker no longer reads"
    assert not set(LEFT_OUT) & listed
    assert len(HUB["config"]["env"]) == len(INPUTS), "a key is listed twice"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["defaults", "model-path", "model-name"])
def test_the_hub_defaults_change_nothing_the_worker_does(scenario: dict[str, str]) -> None:
    defaults = {key: env_value(field, field["default"]) for key, field in INPUTS.items()
                if "default" in field and key not in scenario}
    assert load({**defaults, **scenario}) == load(scenario)
    for key, text in defaults.items():
        if key in DEFAULTS:
            assert text == DEFAULTS[key], f"{key}: hub.json says {text}, the code {DEFAULTS[key]}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=["defaults", "model-path", "model-name"])
def test_a_field_left_empty_means_the_codes_default(scenario: dict[str, str]) -> None:
    for key in INPUTS.keys() - scenario.keys():
        assert load({**scenario, key: ""}) == load(scenario), f"{key}='' changes the settings"


def test_each_input_type_is_what_the_setting_parses() -> None:
    for key, field in INPUTS.items():
        if field["type"] == "number":
            example = field.get("default", field.get("min", 1))
            assert isinstance(example, int | float), key
            load({key: env_value(field, example)})
            assert field.get("min", example) <= example <= field.get("max", example), key
            with pytest.raises(SettingsError):
                load({key: "not-a-number"})
        elif field["type"] == "boolean":
            on, off = load({key: field["trueValue"]}), load({key: field["falseValue"]})
            assert on != off, f"{key}: trueValue and falseValue read the same"
        for option in field.get("options", []):
            load({key: option["value"]})
        if field.get("options") and "default" in field:
            assert field["default"] in [o["value"] for o in field["options"]], key


def test_presets_are_valid_settings_of_listed_fields() -> None:
    for preset in HUB["config"]["presets"]:
        assert set(preset["defaults"]) <= set(INPUTS), preset["name"]
        env = {key: env_value(INPUTS[key], value) for key, value in preset["defaults"].items()}
        assert load(env).model_name == preset["defaults"].get("MODEL_NAME", DEFAULTS["MODEL_NAME"])


def test_hub_tests_send_jobs_the_worker_accepts_naming_the_served_model() -> None:
    env = {item["key"]: item["value"] for item in TESTS["config"]["env"]}
    settings = load(env)
    targets = [Target(m.served_name, f"http://127.0.0.1:{m.port}") for m in settings.models]
    assert TESTS["tests"], "tests.json runs no test"
    for test in TESTS["tests"]:
        request = resolve(test["input"], targets, settings.default_max_tokens, Pacing()).first
        if request.body is not None:
            assert request.body["model"] == settings.served_model_name, test["name"]
        assert isinstance(test["timeout"], int) and test["timeout"] > 0


def test_hub_tests_run_where_the_listing_runs() -> None:
    config = TESTS["config"]
    assert config["gpuCount"] >= 1 and config["gpuTypeId"]
    assert config["allowedCudaVersions"] == HUB["config"]["allowedCudaVersions"]


def test_the_form_offers_the_vllm_settings_users_set_most() -> None:
    most_set = {"QUANTIZATION", "KV_CACHE_DTYPE", "ENABLE_PREFIX_CACHING", "MAX_NUM_SEQS",
                "MAX_NUM_BATCHED_TOKENS", "ENFORCE_EAGER", "TRUST_REMOTE_CODE",
                "CUSTOM_CHAT_TEMPLATE", "SPECULATIVE_CONFIG", "MODEL_REVISION", "TOKENIZER_NAME",
                "PIPELINE_PARALLEL_SIZE", "ENABLE_EXPERT_PARALLEL"}
    assert most_set <= set(INPUTS)
    switches = [key for key in INPUTS if key in BY_VARIABLE and BY_VARIABLE[key].kind == "switch"]
    for key in switches:  # "auto" on the form: a field left alone changes nothing
        assert INPUTS[key].get("default") == "auto" and load({key: "auto"}).flag_args == ()
