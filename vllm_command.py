"""The vLLM command line, built from the settings, and how to show it safely.

`build_command` is pure: settings and the located model in, an argv list out.
Every value is its own argv item and nothing goes through a shell. Secrets
never go on the command line: vLLM and huggingface_hub read `HF_TOKEN` from the
environment the child inherits. `mask` hides any secret that a user put into
`VLLM_EXTRA_ARGS` anyway, before a command line is logged or printed.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence

from parsers import Choice
from settings import SECRET_FLAG, ModelSettings, Settings

MASK = "***"


def build_command(settings: Settings, model: ModelSettings, weights: str, gpu_count: int,
                  parsers: Choice | None = None) -> list[str]:
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
        "--max-model-len", str(model.max_model_len),
        "--dtype", settings.dtype,
    ]
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


def mask_argv(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    """argv with the values of secret-looking flags and any known secret replaced by ***."""
    masked: list[str] = []
    hide_next = False
    for item in argv:
        if hide_next:
            masked.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = item.partition("=")
        if SECRET_FLAG.match(flag):
            if eq:
                masked.append(f"{flag}={MASK}")
                continue
            hide_next = True
        masked.append(mask(item, secrets))
    return masked


def mask(text: str, secrets: Sequence[str]) -> str:
    """`text` with every known secret value replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def show(argv: Sequence[str], secrets: Sequence[str] = ()) -> str:
    """A copy-pasteable, masked command line."""
    return shlex.join(mask_argv(argv, secrets))
