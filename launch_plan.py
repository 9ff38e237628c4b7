"""How each vLLM will be started, decided before anything is spawned.

`plan_launch` is pure apart from reading the model's folder: it locates the
weights, reads what the model's files say (parsers, longest context), and builds
the command line. The worker and the diagnostic (`test_vllm_command.py`) both
call it, so the diagnostic shows exactly what the worker will run. `child_env`
is the environment the child gets: the worker's, minus what vLLM must not see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from model_info import read_model_info
from model_locator import Location, link_for_vllm, locate
from parsers import Choice, choose
from settings import SETTINGS, ModelSettings, Settings
from vllm_command import build_command, count_gpus

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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.model.port}"

    @property
    def reasons(self) -> tuple[str, ...]:
        """Each decision with its reason, in order: where the weights are, which parsers."""
        return self.location.steps + self.parsers.reasons


def child_env(env: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """vLLM's environment: the worker's without its own settings, with HF_HOME (vLLM and
    huggingface_hub read it too) and the download cache the settings chose."""
    kept = {k: v for k, v in env.items() if k not in WORKER_ONLY}
    kept.setdefault("HF_HOME", settings.hf_home)
    if settings.download_cache:
        kept.setdefault("HF_HUB_CACHE", settings.download_cache)
    return kept


def plan_launch(settings: Settings, model: ModelSettings, env: Mapping[str, str]) -> Launch:
    """Locate the weights, pick the parsers and build the command for one model
    (LocatorError or SettingsError when that cannot work)."""
    location = locate(model.name, model.path, settings.hf_home, settings.hub_caches,
                      settings.flag_value("--revision"))
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
    argv = build_command(settings, model, weights, count_gpus(env), choice)
    return Launch(model, location, weights, choice, argv, child_env(env, settings))
