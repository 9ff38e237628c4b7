"""Every setting the worker reads, validated in one pass.

`load(env)` is the only place that looks at environment variables: it takes a
mapping (tests pass plain dicts), applies the defaults below, and raises
`SettingsError` with a sentence naming the variable when a value is invalid,
before anything is spawned. Unset optional vLLM settings stay `None` so that
vLLM's own defaults apply; for the tool-calling and reasoning settings, None
(unset, empty or `auto`) means "pick for the model" (parsers.py) and "" or
False (`false`, `off`, `none`) means "off".
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from masking import secret_values

DEFAULT_MODEL_NAME = "openai/gpt-oss-120b"
RUNPOD_MODEL_CACHE = "/runpod-volume/huggingface-cache/hub"

# Name -> default, as documented in the README's settings table (a test checks both agree).
DEFAULTS: dict[str, str] = {
    "MODEL_NAME": DEFAULT_MODEL_NAME,
    "HF_HOME": "/runpod-volume/huggingface",
    "GPU_MEMORY_UTILIZATION": "0.95",
    "MAX_MODEL_LEN": "8192",
    "DTYPE": "bfloat16",
    "VLLM_PORT": "8000",
    "USE_VLLM_SERVE": "false",
    "VLLM_PYTHON": "python3",
    "MAX_CONCURRENCY": "30",
    "VLLM_STARTUP_TIMEOUT": "1800",
    "REQUEST_TIMEOUT": "600",
    "STREAM_FLUSH_INTERVAL": "0.05",
    "DEFAULT_MAX_TOKENS": "512",
    "SHUTDOWN_GRACE_PERIOD": "30",
    "LOCAL_MAX_BODY_MB": "20",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is invalid; the message names the variable and the accepted values."""


@dataclass(frozen=True)
class ModelSettings:
    """One served model: one vLLM child on its own loopback port."""

    name: str
    path: str | None
    label: str
    served_name: str
    port: int
    gpu_memory_utilization: float
    max_model_len: int
    max_model_len_is_default: bool
    runner: str | None
    convert: str | None


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSettings, ...]
    hf_home: str
    hub_caches: tuple[str, ...]
    dtype: str
    vllm_port: int
    use_vllm_serve: bool
    vllm_python: str
    tensor_parallel_size: int | None
    enable_auto_tool_choice: bool | None
    tool_call_parser: str | None
    reasoning_parser: str | None
    vllm_extra_args: tuple[str, ...]
    vllm_base_url: str | None
    max_concurrency: int
    startup_timeout: float
    request_timeout: float
    stream_flush_interval: float
    default_max_tokens: int
    min_batch_size: int | None
    max_batch_size: int | None
    batch_size_growth_factor: float | None
    shutdown_grace_period: float
    local_api_key: str | None
    local_max_body_bytes: int
    secrets: tuple[str, ...]

    # The first (or only) model's values, for what concerns a single model.
    @property
    def model_name(self) -> str:
        return self.models[0].name

    @property
    def model_path(self) -> str | None:
        return self.models[0].path

    @property
    def served_model_name(self) -> str:
        """The name clients send as `model`."""
        return self.models[0].served_name

    @property
    def upstream_url(self) -> str:
        """Where the first vLLM answers: the external server, else the child on loopback."""
        return (self.vllm_base_url or f"http://127.0.0.1:{self.models[0].port}").rstrip("/")


def _value(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, with empty strings treated as unset."""
    raw = env.get(name, DEFAULTS.get(name))
    if raw is None or raw.strip() == "":
        return DEFAULTS.get(name)
    return raw.strip()


def _number(env: Mapping[str, str], name: str, cast: Callable[[str], T], rule: str,
            ok: Callable[[T], bool]) -> T | None:
    raw = _value(env, name)
    if raw is None:
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not valid: it must be {rule}.") from None
    if not ok(value):
        raise SettingsError(f"{name}={raw!r} is not valid: it must be {rule}.")
    return value


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    return _number(env, name, int, "a whole number above 0", lambda v: v > 0)


def _positive_float(env: Mapping[str, str], name: str) -> float | None:
    return _number(env, name, float, "a number of seconds above 0", lambda v: 0 < v < float("inf"))


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = _value(env, name)
    if raw is None:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not valid: it must be true or false.")


_OFF = {"false", "off", "none", "0"}


def _parser(env: Mapping[str, str], name: str) -> str | None:
    """A parser name; None (unset, empty or `auto`) picks one for the model; "" (`off`,
    `false`, `none`) turns the feature off. Empty is not "off": a Hub form field left
    blank arrives empty, and must not silently turn tool calling off."""
    raw = (env.get(name) or "").strip()
    if raw.lower() in {"", "auto"}:
        return None
    return "" if raw.lower() in _OFF else raw


def _switch(env: Mapping[str, str], name: str) -> bool | None:
    """True/False when set, None when unset, empty or `auto`."""
    if (env.get(name) or "").strip().lower() == "auto":
        return None
    return _bool(env, name)


def _extra_args(env: Mapping[str, str]) -> tuple[str, ...]:
    try:
        args = tuple(shlex.split(_value(env, "VLLM_EXTRA_ARGS") or ""))
    except ValueError as exc:
        raise SettingsError(f"VLLM_EXTRA_ARGS cannot be split into arguments: {exc}.") from None
    for arg in args:
        # argparse keeps the last value (and takes abbreviations): `--host` here would win
        # over 127.0.0.1 and open vLLM's admin routes, kept from job input, to the network.
        flag = arg.partition("=")[0]
        if len(flag) > 3 and "--host".startswith(flag):
            raise SettingsError(f"VLLM_EXTRA_ARGS must not set --host (got {arg!r}): vLLM "
                                "listens on 127.0.0.1, where only this worker can reach it.")
    return args


def _split(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(";") if part.strip()]


def _per_model(env: Mapping[str, str], name: str, count: int, cast: Callable[[str], T],
               rule: str, ok: Callable[[T], bool]) -> list[T | None]:
    """A value for each model: one value for all, or a semicolon list with one per model."""
    parts = _split(env.get(name)) or [None]
    if len(parts) not in (1, count):
        raise SettingsError(f"{name} has {len(parts)} values for {count} models (MODEL_NAMES): "
                            "give one value, or one per model separated by ';'.")
    values = []
    for part in parts:
        values.append(None if part is None else _number({name: part}, name, cast, rule, ok))
    return values * count if len(values) == 1 else values


def _models(env: Mapping[str, str], port: int) -> tuple[ModelSettings, ...]:
    """MODEL_NAMES (several models, one vLLM each) or MODEL_NAME/MODEL_PATH (one)."""
    names = _split(env.get("MODEL_NAMES"))
    path = _value(env, "MODEL_PATH")
    if names and path:
        raise SettingsError("MODEL_PATH serves one model; with MODEL_NAMES give each model's "
                            "hub id or absolute path in the list instead.")
    if not names:
        names = [_value(env, "MODEL_NAME") or DEFAULT_MODEL_NAME]
    labels = list(names)
    if path and not (env.get("MODEL_NAME") or "").strip():
        labels = [path.rstrip("/").rsplit("/", 1)[-1]]  # no name given: the folder's
    count = len(names)
    overrides = _split(env.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE"))
    if len(overrides) not in (0, count):
        raise SettingsError(f"OPENAI_SERVED_MODEL_NAME_OVERRIDE has {len(overrides)} names for "
                            f"{count} models: give one per model, separated by ';'.")
    served = overrides or labels
    if len(set(served)) != count:
        raise SettingsError(f"Two models would be served under the same name: {served}.")
    if len(_split(env.get("GPU_MEMORY_UTILIZATION"))) > 1:
        share = _per_model(env, "GPU_MEMORY_UTILIZATION", count, float, "a fraction in (0, 1]",
                           lambda v: 0 < v <= 1)
        if sum(v or 0 for v in share) > 1:
            raise SettingsError("GPU_MEMORY_UTILIZATION values add up to more than 1: the models "
                                "share the GPUs.")
    else:  # one budget for all, split evenly
        total = _number(env, "GPU_MEMORY_UTILIZATION", float, "a fraction in (0, 1]",
                        lambda v: 0 < v <= 1)
        share = [round((total or 0) / count, 4)] * count
    lengths = _per_model(env, "MAX_MODEL_LEN", count, int, "a whole number above 0",
                         lambda v: v > 0)
    runners = _split(env.get("RUNNER")) or [None]
    converts = _split(env.get("CONVERT")) or [None]
    for variable, values in (("RUNNER", runners), ("CONVERT", converts)):
        if len(values) not in (1, count):
            raise SettingsError(f"{variable} has {len(values)} values for {count} models: give "
                                "one value, or one per model separated by ';'.")
    return tuple(
        ModelSettings(
            name=names[i], path=path, label=labels[i], served_name=served[i], port=port + i,
            gpu_memory_utilization=share[i] or 0.0,
            max_model_len=lengths[i] or int(DEFAULTS["MAX_MODEL_LEN"]),
            max_model_len_is_default=lengths[i] is None,
            runner=_auto_is_none(runners[i % len(runners)]),
            convert=_auto_is_none(converts[i % len(converts)]))
        for i in range(count))


def _auto_is_none(value: str | None) -> str | None:
    return None if value is None or value.lower() == "auto" else value


def load(env: Mapping[str, str]) -> Settings:
    """Read and validate every setting; raise `SettingsError` on the first invalid one."""
    port = _number(env, "VLLM_PORT", int, "a TCP port between 1 and 65535",
                   lambda v: 0 < v < 65536)
    growth = _number(env, "DEFAULT_BATCH_SIZE_GROWTH_FACTOR", float, "a number of at least 1",
                     lambda v: 1 <= v < float("inf"))
    tool_choice = _switch(env, "ENABLE_AUTO_TOOL_CHOICE")
    base_url = _value(env, "VLLM_BASE_URL")
    if base_url and not re.match(r"^https?://[^/\s]+", base_url):
        raise SettingsError(f"VLLM_BASE_URL={base_url!r} is not valid: it must be an http(s) URL.")
    models = _models(env, port)
    if base_url and len(models) > 1:
        raise SettingsError("VLLM_BASE_URL names one vLLM server: it cannot be combined with "
                            "several MODEL_NAMES.")
    caches = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE")]
    hf_home = _value(env, "HF_HOME") or DEFAULTS["HF_HOME"]
    hub_caches = [f"{hf_home.rstrip('/')}/hub", *[c for c in caches if c], RUNPOD_MODEL_CACHE]
    return Settings(
        models=models,
        hf_home=hf_home,
        hub_caches=tuple(dict.fromkeys(hub_caches)),
        dtype=_value(env, "DTYPE"),
        vllm_port=port,
        use_vllm_serve=bool(_bool(env, "USE_VLLM_SERVE")),
        vllm_python=_value(env, "VLLM_PYTHON"),
        tensor_parallel_size=_positive_int(env, "TENSOR_PARALLEL_SIZE"),
        enable_auto_tool_choice=tool_choice,
        tool_call_parser=_parser(env, "TOOL_CALL_PARSER"),
        reasoning_parser=_parser(env, "REASONING_PARSER"),
        vllm_extra_args=_extra_args(env),
        vllm_base_url=base_url,
        max_concurrency=_positive_int(env, "MAX_CONCURRENCY"),
        startup_timeout=_positive_float(env, "VLLM_STARTUP_TIMEOUT"),
        request_timeout=_positive_float(env, "REQUEST_TIMEOUT"),
        stream_flush_interval=_number(env, "STREAM_FLUSH_INTERVAL", float,
                                      "a number of seconds from 0 to 0.1",
                                      lambda v: 0 <= v <= 0.1),
        default_max_tokens=_positive_int(env, "DEFAULT_MAX_TOKENS"),
        min_batch_size=_positive_int(env, "DEFAULT_MIN_BATCH_SIZE"),
        max_batch_size=_positive_int(env, "DEFAULT_BATCH_SIZE"),
        batch_size_growth_factor=growth,
        shutdown_grace_period=_number(env, "SHUTDOWN_GRACE_PERIOD", float,
                                      "a number of seconds of at least 0",
                                      lambda v: 0 <= v < float("inf")),
        local_api_key=_value(env, "LOCAL_API_KEY"),
        local_max_body_bytes=int(_number(env, "LOCAL_MAX_BODY_MB", float, "a number of MB above 0",
                                         lambda v: 0 < v <= 1024) * (1 << 20)),
        secrets=secret_values(env),
    )
