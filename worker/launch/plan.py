"""How each vLLM will be started, decided before anything is spawned.

`plan_launches` is pure apart from reading the models' folders: it locates the
weights, reads what the model's files say (parsers, longest context), finds the LoRA
adapters, and builds each command line. The worker and the diagnostic
(`test_vllm_command.py`) both call it, so the diagnostic shows exactly what the worker will
run. `child_env` is the environment the child gets: the worker's, minus what vLLM must not
see.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from model_locator import Location, link_for_vllm, locate, weights_size
from worker.launch import adapters as lora
from worker.launch import compile_cache
from worker.launch.command import build_command, count_gpus, lora_flags
from worker.launch.model_facts import read_model_info
from worker.launch.parser_choice import Choice, choose
from worker.settings.loader import SETTINGS, ModelSettings, Settings

# Worker settings that vLLM would misread (it uses VLLM_PORT for its own internal ports)
# or warn about, and secrets it has no use for: kept out of the child's environment.
WORKER_ONLY = frozenset(s.name for s in SETTINGS if s.worker_only)


@dataclass(frozen=True)
class Launch:
    """How one vLLM will be started: where its weights are, what it is given, which parsers."""

    model: ModelSettings
    location: Location
    weights: str
    parsers: Choice
    argv: list[str]
    env: dict[str, str]
    cache: str = ""  # where vLLM's compile cache is, and why
    weights_bytes: int | None = None  # None: not on disk (weights.py downloads them)
    located_in: float = 0.0  # seconds the search for the weights took
    adapters: tuple[lora.Adapter, ...] = ()  # the static LoRA adapters it serves
    lora_rank: int = lora.DEFAULT_RANK  # the largest adapter rank its vLLM makes room for
    downloaded: str = ""  # the worker's download of its weights, when there was one

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.model.port}"

    @property
    def reasons(self) -> tuple[str, ...]:
        """Each decision with its reason, in order: where the weights are, which parsers."""
        return (*self.location.steps, *self.parsers.reasons, *((self.cache,) if self.cache else ()))


def child_env(env: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """vLLM's environment: the worker's without its own settings, with HF_HOME (vLLM and
    huggingface_hub read it too) and the download cache the settings chose."""
    kept = {k: v for k, v in env.items() if k not in WORKER_ONLY}
    kept.setdefault("HF_HOME", settings.hf_home)
    if settings.download_cache:
        kept.setdefault("HF_HUB_CACHE", settings.download_cache)
    return kept


def plan_launches(settings: Settings, env: Mapping[str, str]) -> list[Launch]:
    """Every model located, the LoRA adapters found and routed, each model's command
    (LocatorError or SettingsError when that cannot work)."""
    located = []
    for model in settings.models:
        started = time.monotonic()
        location = locate(model.name, model.path, settings.hf_home, settings.hub_caches,
                          settings.flag_value("--revision"))
        located.append((model, location, time.monotonic() - started))
    adapters = lora.plan(settings, [(model, location) for model, location, _ in located])
    return [_launch(settings, model, location, located_in, adapters, env)
            for model, location, located_in in located]


def _launch(settings: Settings, model: ModelSettings, location: Location, located_in: float,
            adapters: lora.LoraPlan, env: Mapping[str, str]) -> Launch:
    weights = location.model
    if location.is_local:
        weights = link_for_vllm(location.model, settings.hf_home, model.served_name)
    info = read_model_info(model.label, location.model if location.is_local else None)
    if info.generative:
        choice = choose(info, settings.enable_auto_tool_choice, settings.tool_call_parser,
                        settings.reasoning_parser)
    else:
        choice = Choice(None, None, (f"{model.label} does not generate text "
                                     f"({', '.join(info.architectures)}): no parsers",))
    limit = info.max_positions
    if (model.max_model_len_is_default and limit is not None and model.max_model_len is not None
            and limit < model.max_model_len):
        model = replace(model, max_model_len=limit)
        choice = replace(choice, reasons=(*choice.reasons, f"context length {limit}: the "
                                          f"longest {model.label} allows (MAX_MODEL_LEN unset)"))
    extra, lora_reasons = lora_flags(settings, adapters, model.served_name, info.generative)
    choice = replace(choice, reasons=(*choice.reasons, *lora_reasons))
    argv = build_command(settings, model, weights, count_gpus(env), choice, extra)
    child = child_env(env, settings)
    if not child.get("VLLM_CACHE_ROOT"):
        child.pop("VLLM_CACHE_ROOT", None)  # empty means unset to vLLM too, not the cwd
    if settings.lora_dir:  # the worker loads them through vLLM's loopback admin route
        child["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    root, cache = compile_cache.choose(child, settings.compile_cache_on_volume, settings.hf_home,
                                       model.served_name,
                                       location.model if location.is_local else None)
    if root is not None:
        child["VLLM_CACHE_ROOT"] = root
    size = weights_size(location.model) if location.is_local else None
    return Launch(model, location, weights, choice, argv, child, cache, size, located_in,
                  tuple(adapters.for_model(model.served_name)), adapters.max_rank)
