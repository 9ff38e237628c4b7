"""Read and validate every setting in one pass, before anything is spawned.

`load(env)` is the only place that looks at environment variables: it takes a
mapping (tests pass plain dicts), reads each row of table.SETTINGS, turns
every `vllm serve` flag variable into its argv (vllm_flags.py), and raises
`SettingsError` with a sentence naming the variable when a value is invalid.

When one flag is given more than once, the first of these wins: a named worker
setting (`MAX_MODEL_LEN`, `MODEL_REVISION`, ...), then the flag's own variable
(`REVISION`), then the config file (`VLLM_CONFIG_FILE`: vLLM lets command-line
flags override it). `VLLM_EXTRA_ARGS` comes last on the command line, so a flag
there overrides all of them; each such override is a warning. Variables that mean
nothing any more are accepted with a note; a name one or two letters away from a
setting gets a warning naming the setting it probably meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.masking import secret_values
from worker.settings.config_file import config_flags
from worker.settings.misspellings import closest, near_misses
from worker.settings.table import BY_NAME, SETTINGS, SettingsError
from worker.settings.vllm_flags import (
    ALIASES,
    BY_VARIABLE,
    FLAGS,
    RETIRED,
    VLLM_VERSION,
    FlagArg,
    FlagError,
    flag_argv,
    known_flag,
)

__all__ = ["FlagArg", "ModelSettings", "Settings", "SettingsError", "load", "SETTINGS"]
RUNPOD_MODEL_CACHE = "/runpod-volume/huggingface-cache/hub"
DEFAULTS = {s.name: s.default for s in SETTINGS if s.default is not None}
DEFAULT_MODEL_NAME = DEFAULTS["MODEL_NAME"]
DEFAULT_CONTEXT = int(BY_NAME["MAX_MODEL_LEN"].default or 8192)
# Flags the worker's own settings set: their variables are those settings.
NAMED_FLAGS = {"--max-model-len", "--gpu-memory-utilization", "--dtype", "--runner", "--convert",
               "--tensor-parallel-size", "--enable-auto-tool-choice", "--tool-call-parser",
               "--reasoning-parser", "--model", "--served-model-name", "--host", "--port",
               "--enable-lora", "--max-lora-rank", "--lora-modules"}


@dataclass(frozen=True)
class ModelSettings:
    """One served model: one vLLM child on its own loopback port."""

    name: str
    path: str | None
    label: str
    served_name: str
    port: int
    gpu_memory_utilization: float
    max_model_len: int | None  # None: vLLM's own choice (MAX_MODEL_LEN=auto)
    max_model_len_is_default: bool
    runner: str | None
    convert: str | None


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelSettings, ...]
    hf_home: str
    hub_caches: tuple[str, ...]
    download_cache: str | None  # where models are downloaded to, when not HF_HOME/hub
    dtype: str | None
    vllm_port: int
    use_vllm_serve: bool
    vllm_python: str
    tensor_parallel_size: int | None
    enable_auto_tool_choice: bool | None
    tool_call_parser: str | None
    reasoning_parser: str | None
    flag_args: tuple[FlagArg, ...]  # from variables, in the command line
    config_args: tuple[FlagArg, ...]  # in the config file, which vLLM reads itself
    vllm_extra_args: tuple[str, ...]
    vllm_api_key: str | None  # --api-key in VLLM_EXTRA_ARGS: sent on the worker's requests
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
    failed_start_seconds: float
    local_api_key: str | None
    local_max_body_bytes: int
    port: int | None  # load-balancing mode's, with port_health for /ping
    port_health: int | None
    api_key: str | None
    load_balancing: bool  # serve HTTP on PORT (no job queue) rather than take jobs
    compile_cache_on_volume: bool
    enable_lora: bool | None
    lora_modules: str | None
    lora_dir: str | None
    max_lora_rank: int | None
    secrets: tuple[str, ...]
    notes: tuple[str, ...] = ()  # one line each: a retired or renamed variable
    warnings: tuple[str, ...] = ()

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

    def flag_value(self, flag: str) -> str | None:
        """The value a variable gives `flag` (None when none does)."""
        found = [arg.argv[1] for arg in self.flag_args if arg.flag == flag and len(arg.argv) > 1]
        return found[0] if found else None

    @property
    def upstream_url(self) -> str:
        """Where the first vLLM answers: the external server, else the child on loopback."""
        return self.vllm_base_url or f"http://127.0.0.1:{self.models[0].port}"


def raw(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, stripped; None when unset or empty."""
    value = (env.get(name) or "").strip()
    return value or None


def value(env: Mapping[str, str], name: str) -> Any:
    """A table setting's value: read from the variable, else from its default."""
    setting = BY_NAME[name]
    given = raw(env, name) or setting.default
    return None if given is None else setting.read(name, given)


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(";") if part.strip()]


def _per_model(env: Mapping[str, str], name: str, count: int) -> list[Any]:
    """A value for each model: one value for all, or a semicolon list with one per model."""
    parts = _split(raw(env, name)) or [BY_NAME[name].default]
    if len(parts) not in (1, count):
        raise SettingsError(f"{name} has {len(parts)} values for {count} models (MODEL_NAMES): "
                            "give one value, or one per model separated by ';'.")
    values = [None if p is None else BY_NAME[name].read(name, p) for p in parts]
    return values * count if len(values) == 1 else values


def _models(env: Mapping[str, str], port: int) -> tuple[ModelSettings, ...]:
    """MODEL_NAMES (several models, one vLLM each) or MODEL_NAME/MODEL_PATH (one)."""
    names = _split(raw(env, "MODEL_NAMES"))
    path = raw(env, "MODEL_PATH")
    if names and path:
        raise SettingsError("MODEL_PATH serves one model; with MODEL_NAMES give each model's "
                            "hub id or absolute path in the list instead.")
    names = names or [raw(env, "MODEL_NAME") or DEFAULT_MODEL_NAME]
    labels = list(names)
    if path and not raw(env, "MODEL_NAME"):
        labels = [path.rstrip("/").rsplit("/", 1)[-1]]  # no name given: the folder's
    count = len(names)
    overrides = _split(raw(env, "OPENAI_SERVED_MODEL_NAME_OVERRIDE"))
    if len(overrides) not in (0, count):
        raise SettingsError(f"OPENAI_SERVED_MODEL_NAME_OVERRIDE has {len(overrides)} names for "
                            f"{count} models: give one per model, separated by ';'.")
    served = overrides or labels
    if len(set(served)) != count:
        raise SettingsError(f"Two models would be served under the same name: {served}.")
    shares = _per_model(env, "GPU_MEMORY_UTILIZATION", count)
    if len(_split(raw(env, "GPU_MEMORY_UTILIZATION"))) > 1:
        if sum(shares) > 1:
            raise SettingsError("GPU_MEMORY_UTILIZATION values add up to more than 1: the "
                                "models share the GPUs.")
    else:  # one budget for all, split evenly
        shares = [round(shares[0] / count, 4)] * count
    lengths = _per_model(env, "MAX_MODEL_LEN", count)
    runners, converts = _per_model(env, "RUNNER", count), _per_model(env, "CONVERT", count)
    given_length = raw(env, "MAX_MODEL_LEN") is not None
    return tuple(
        ModelSettings(name=names[i], path=path, label=labels[i], served_name=served[i],
                      port=port + i, gpu_memory_utilization=shares[i],
                      max_model_len=lengths[i], max_model_len_is_default=not given_length,
                      runner=runners[i], convert=converts[i])
        for i in range(count))


def _variable_flags(env: Mapping[str, str], notes: list[str], warnings: list[str]
                    ) -> dict[str, FlagArg]:
    """Every flag set by its own variable or by a worker-vllm name (the latter wins)."""
    found: dict[str, FlagArg] = {}
    for variable in sorted(set(env) & set(BY_VARIABLE)):
        flag = BY_VARIABLE[variable]
        if variable not in BY_NAME and flag.flag not in NAMED_FLAGS and raw(env, variable):
            argv = tuple(_argv(flag.flag, variable, env))
            if not argv and raw(env, variable) == "0":
                notes.append(f"{variable}=0 leaves {flag.flag} to vLLM (it refuses 0)")
            found[flag.flag] = FlagArg(flag.flag, argv, variable)
    for alias, flag in ALIASES.items():
        if not raw(env, alias):
            continue
        own = FLAGS[flag].variable
        notes.append(f"{alias} is worker-vllm's name for {own} ({flag}): used as such")
        if flag in found and found[flag].source != alias:
            warnings.append(f"{alias} and {own} both set {flag}: {alias} wins")
        found[flag] = FlagArg(flag, tuple(_argv(flag, alias, env)), alias)
    return {flag: arg for flag, arg in found.items() if arg.argv}


def _argv(flag: str, variable: str, env: Mapping[str, str]) -> list[str]:
    try:
        return flag_argv(FLAGS[flag], variable, env[variable])
    except FlagError as exc:
        raise SettingsError(str(exc)) from None


def _extra_args(env: Mapping[str, str], flags: dict[str, FlagArg], warnings: list[str]
                ) -> tuple[tuple[str, ...], str | None]:
    """VLLM_EXTRA_ARGS, checked: no --host, a warning for a flag the pinned vLLM lacks or
    one that overrides a variable; and its --api-key, which the worker must then send."""
    args: tuple[str, ...] = value(env, "VLLM_EXTRA_ARGS") or ()
    api_key = None
    for i, arg in enumerate(args):
        name = arg.partition("=")[0]
        if not name.startswith("--") or name == "--":
            continue
        # argparse keeps the last value (and takes abbreviations): `--host` here would win
        # over 127.0.0.1 and open vLLM's admin routes, kept from job input, to the network.
        if len(name) > 3 and "--host".startswith(name):
            raise SettingsError(f"VLLM_EXTRA_ARGS must not set --host (got {arg!r}): vLLM "
                                "listens on 127.0.0.1, where only this worker can reach it.")
        flag = known_flag(arg)
        if flag is None:  # the escape hatch stays open: the image may have a newer vLLM
            near = closest(name, [f.flag for f in FLAGS.values()])
            hint = f" (did you mean {near}?)" if near else ""
            warnings.append(f"VLLM_EXTRA_ARGS has {name}, which vLLM {VLLM_VERSION} does not "
                            f"have{hint}: vLLM refuses it at start unless it is newer")
        elif flag.flag == "--api-key":
            api_key = arg.partition("=")[2] or (args[i + 1] if i + 1 < len(args) else None)
        elif flag.flag in flags:
            warnings.append(f"VLLM_EXTRA_ARGS sets {flag.flag}, which {flags[flag.flag].source} "
                            "also sets: VLLM_EXTRA_ARGS wins (it comes last)")
    return args, api_key


def _caches(env: Mapping[str, str], hf_home: str, notes: list[str]
            ) -> tuple[tuple[str, ...], str | None]:
    """The hub caches searched, in order, and vLLM's download cache when it is not
    HF_HOME's: worker-vllm's BASE_PATH layout keeps both in BASE_PATH/huggingface-cache."""
    given = [raw(env, "HF_HUB_CACHE"), raw(env, "HUGGINGFACE_HUB_CACHE")]
    caches = [f"{hf_home.rstrip('/')}/hub", *[c for c in given if c], RUNPOD_MODEL_CACHE]
    download = None
    if base := raw(env, "BASE_PATH"):
        legacy = f"{base.rstrip('/')}/huggingface-cache/hub"
        caches.insert(0, legacy)
        if not any(given):
            download = legacy
        notes.append(f"BASE_PATH={base}: models are searched in {legacy} first"
                     + (", and downloaded there" if download else ""))
    return tuple(dict.fromkeys(caches)), download


def _lora(env: Mapping[str, str]) -> dict[str, Any]:
    """The LoRA settings, consistent: adapters turn LoRA on, and cannot go with it off."""
    enable, modules, folder = (value(env, "ENABLE_LORA"), value(env, "LORA_MODULES"),
                               value(env, "LORA_DIR"))
    if enable is False and (modules or folder):
        raise SettingsError("ENABLE_LORA=false, but LORA_MODULES or LORA_DIR names adapters: "
                            "remove one of them.")
    if folder is not None and not Path(folder).is_dir():
        raise SettingsError(f"LORA_DIR={folder} is not a folder.")
    rank = value(env, "MAX_LORA_RANK")
    return {"enable_lora": enable, "lora_modules": modules, "lora_dir": folder,
            "max_lora_rank": int(rank) if rank is not None else None}


def load(env: Mapping[str, str]) -> Settings:
    """Read and validate every setting; raise `SettingsError` on the first invalid one."""
    notes = [f"{name} is {note}" for name, note in RETIRED.items() if raw(env, name)]
    warnings = list(near_misses(env))
    port = value(env, "VLLM_PORT")
    base_url = value(env, "VLLM_BASE_URL")
    models = _models(env, port)
    if base_url and len(models) > 1:
        raise SettingsError("VLLM_BASE_URL names one vLLM server: it cannot be combined with "
                            "several MODEL_NAMES.")
    flags = _variable_flags(env, notes, warnings)
    config = flags.get("--config")
    in_file = config_flags(config.argv[1], config.source) if config else {}
    warnings += [f"{arg.source} sets {flag}, and so does {flags[flag].source}, which wins"
                 for flag, arg in in_file.items() if flag in flags]
    extra, api_key = _extra_args(env, {**in_file, **flags}, warnings)
    hf_home = value(env, "HF_HOME")
    hub_caches, download = _caches(env, hf_home, notes)
    port_lb = value(env, "PORT")
    return Settings(
        models=models, hf_home=hf_home, hub_caches=hub_caches, download_cache=download,
        dtype=value(env, "DTYPE"), vllm_port=port, use_vllm_serve=value(env, "USE_VLLM_SERVE"),
        vllm_python=value(env, "VLLM_PYTHON"),
        tensor_parallel_size=value(env, "TENSOR_PARALLEL_SIZE"),
        enable_auto_tool_choice=value(env, "ENABLE_AUTO_TOOL_CHOICE"),
        tool_call_parser=value(env, "TOOL_CALL_PARSER"),
        reasoning_parser=value(env, "REASONING_PARSER"),
        flag_args=tuple(flags.values()), config_args=tuple(in_file.values()),
        vllm_extra_args=extra, vllm_api_key=api_key, vllm_base_url=base_url,
        max_concurrency=value(env, "MAX_CONCURRENCY"),
        startup_timeout=value(env, "VLLM_STARTUP_TIMEOUT"),
        request_timeout=value(env, "REQUEST_TIMEOUT"),
        stream_flush_interval=value(env, "STREAM_FLUSH_INTERVAL"),
        default_max_tokens=value(env, "DEFAULT_MAX_TOKENS"),
        min_batch_size=value(env, "DEFAULT_MIN_BATCH_SIZE"),
        max_batch_size=value(env, "DEFAULT_BATCH_SIZE"),
        batch_size_growth_factor=value(env, "DEFAULT_BATCH_SIZE_GROWTH_FACTOR"),
        shutdown_grace_period=value(env, "SHUTDOWN_GRACE_PERIOD"),
        failed_start_seconds=value(env, "FAILED_START_SECONDS"),
        local_api_key=value(env, "LOCAL_API_KEY"),
        local_max_body_bytes=int(value(env, "LOCAL_MAX_BODY_MB") * (1 << 20)),
        port=port_lb, port_health=value(env, "PORT_HEALTH") or port_lb,
        api_key=value(env, "API_KEY"),
        load_balancing=port_lb is not None and not raw(env, "RUNPOD_WEBHOOK_GET_JOB"),
        compile_cache_on_volume=value(env, "COMPILE_CACHE_ON_VOLUME"),
        **_lora(env),
        secrets=secret_values(env), notes=tuple(notes), warnings=tuple(warnings))

