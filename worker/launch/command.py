"""The vLLM command line, built from the settings.

`build_command` is pure: settings and the located model in, an argv list out, in
the order of the settings loader's precedence: what the worker owns (where vLLM listens,
what it serves), the named settings, the flag variables, `VLLM_EXTRA_ARGS` last.
Every value is its own argv item and nothing goes through a shell. Secrets
never go on the command line: vLLM and huggingface_hub read `HF_TOKEN` from the
environment the child inherits (`masking.show` prints a command line safely).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from worker.launch.adapters import DEFAULT_RANK, LoraPlan
from worker.launch.parser_choice import Choice
from worker.settings.loader import ModelSettings, Settings


def build_command(settings: Settings, model: ModelSettings, weights: str, gpu_count: int,
                  parsers: Choice | None = None, extra: list[str] | None = None) -> list[str]:
    """argv for a vLLM OpenAI server serving `weights` as `model` on loopback."""
    if settings.use_vllm_serve:
        argv = ["vllm", "serve", weights]
    else:
        argv = [settings.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", weights]
    argv += [
        "--host", "127.0.0.1",
        "--port", str(model.port),
        "--served-model-name", model.served_name,
        "--gpu-memory-utilization", f"{model.gpu_memory_utilization:g}",
    ]
    if model.max_model_len is not None:
        argv += ["--max-model-len", str(model.max_model_len)]
    if settings.dtype is not None:
        argv += ["--dtype", settings.dtype]
    tensor_parallel = settings.tensor_parallel_size or (gpu_count if gpu_count > 1 else None)
    if tensor_parallel:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    if model.runner:
        argv += ["--runner", model.runner]
    if model.convert:
        argv += ["--convert", model.convert]
    if parsers is not None and parsers.tool_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", parsers.tool_parser]
    if parsers is not None and parsers.reasoning_parser:
        argv += ["--reasoning-parser", parsers.reasoning_parser]
    argv += extra or []  # the model's own (its LoRA adapters)
    for flag in settings.flag_args:
        argv += flag.argv
    return argv + list(settings.vllm_extra_args)


def count_gpus(env: Mapping[str, str]) -> int:
    """GPUs vLLM will see: CUDA_VISIBLE_DEVICES when set, else the NVIDIA driver's list."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def lora_flags(settings: Settings, adapters: LoraPlan, served_name: str,
               generative: bool = True) -> tuple[list[str], list[str]]:
    """The LoRA flags of one model's vLLM, and why: its static adapters, and room for the
    on-demand ones of LORA_DIR, which only a model that generates text is given (vLLM's
    embedding and scoring models take no adapters)."""
    mine = adapters.for_model(served_name)
    if not mine and not generative:
        why = f"{served_name} generates no text: no LoRA adapters for it"
        return [], [why] if settings.lora_dir or settings.enable_lora else []
    if not (mine or settings.lora_dir or settings.enable_lora):
        return [], []
    argv = ["--enable-lora"]
    if adapters.max_rank != DEFAULT_RANK or settings.max_lora_rank is not None:
        argv += ["--max-lora-rank", str(adapters.max_rank)]
    if mine:  # one flag with every adapter: vLLM keeps only the last --lora-modules given
        argv += ["--lora-modules", *(json.dumps({"name": adapter.name, "path": adapter.path,
                                                 "base_model_name": served_name})
                                     for adapter in mine)]
    reasons = [adapter.found for adapter in mine]
    if adapters.rank_reason:
        reasons.append(adapters.rank_reason)
    if settings.lora_dir:
        reasons.append(f"LoRA adapters of {settings.lora_dir} are loaded when a request first "
                       "names them")
    return argv, reasons
