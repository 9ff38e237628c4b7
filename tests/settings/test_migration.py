"""Coming from worker-vllm: its Hub form's defaults and realistic endpoints load without an
error and give the vLLM command one would expect, flag for flag."""

from __future__ import annotations

import pytest

from worker.launch.command import build_command
from worker.launch.model_facts import ModelInfo
from worker.launch.parser_choice import choose
from worker.settings.loader import load

# worker-vllm's .runpod/hub.json defaults, as the Hub form sends them (booleans as true or
# false, unset fields left out, blank ones empty).
WORKER_VLLM_HUB_DEFAULTS = {
    "TOKENIZER_MODE": "auto", "SKIP_TOKENIZER_INIT": "false", "TRUST_REMOTE_CODE": "false",
    "DTYPE": "auto", "KV_CACHE_DTYPE": "auto", "MAX_MODEL_LEN": "auto",
    "DISTRIBUTED_EXECUTOR_BACKEND": "mp", "RAY_WORKERS_USE_NSIGHT": "false",
    "PIPELINE_PARALLEL_SIZE": "1", "TENSOR_PARALLEL_SIZE": "1",
    "MAX_PARALLEL_LOADING_WORKERS": "1", "ENABLE_PREFIX_CACHING": "false",
    "DISABLE_SLIDING_WINDOW": "false", "SEED": "0", "MAX_NUM_SEQS": "256", "MAX_LOGPROBS": "20",
    "DISABLE_LOG_STATS": "false", "ENABLE_LORA": "false", "MAX_LORAS": "1",
    "MAX_LORA_RANK": "16", "LORA_DTYPE": "auto", "FULLY_SHARDED_LORAS": "false",
    "DEVICE": "auto", "SCHEDULER_DELAY_FACTOR": "0", "ENABLE_CHUNKED_PREFILL": "true",
    "SPECULATIVE_METHOD": "", "ENABLE_LOG_REQUESTS": "false", "GPU_MEMORY_UTILIZATION": "0.95",
    "BLOCK_SIZE": "16", "ENFORCE_EAGER": "false", "DISABLE_CUSTOM_ALL_REDUCE": "false",
    "DEFAULT_BATCH_SIZE": "50", "DEFAULT_MIN_BATCH_SIZE": "1",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "3", "RAW_OPENAI_OUTPUT": "true",
    "OPENAI_RESPONSE_ROLE": "assistant", "MAX_CONCURRENCY": "30",
    "ENABLE_EXPERT_PARALLEL": "false", "BASE_PATH": "/runpod-volume",
    "ENABLE_AUTO_TOOL_CHOICE": "false", "TOOL_CALL_PARSER": "", "REASONING_PARSER": "",
    "PYTORCH_ALLOC_CONF": "expandable_segments:True", "VLLM_USE_DEEP_GEMM": "0",
}
OWN = ["--host", "127.0.0.1", "--port", "8000"]


def command(env: dict[str, str]) -> list[str]:
    """The vLLM command after `--model <name>` for a model found nowhere on disk."""
    settings = load(env)
    model = settings.models[0]
    parsers = choose(ModelInfo(model.label), settings.enable_auto_tool_choice,
                     settings.tool_call_parser, settings.reasoning_parser)
    argv = build_command(settings, model, model.name, 1, parsers)
    assert argv[:5] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model",
                        model.name]
    return argv[5:]


def test_worker_vllms_hub_defaults_load_and_give_vllm_the_same_choices() -> None:
    env = {**WORKER_VLLM_HUB_DEFAULTS, "MODEL_NAME": "openai/gpt-oss-20b"}
    assert command(env) == [
        *OWN, "--served-model-name", "openai/gpt-oss-20b", "--gpu-memory-utilization", "0.95",
        "--tensor-parallel-size", "1", "--reasoning-parser", "openai_gptoss",
        "--block-size", "16", "--no-disable-custom-all-reduce", "--no-disable-sliding-window",
        "--distributed-executor-backend", "mp", "--enable-chunked-prefill",
        "--no-enable-expert-parallel", "--no-enable-log-requests",
        "--no-enable-prefix-caching", "--no-enforce-eager", "--no-fully-sharded-loras",
        "--max-logprobs", "20", "--max-loras", "1",  # LoRA off: no LoRA flags of its own
        "--max-num-seqs", "256", "--max-parallel-loading-workers", "1",
        "--pipeline-parallel-size", "1", "--no-ray-workers-use-nsight", "--seed", "0",
        "--no-skip-tokenizer-init", "--no-trust-remote-code", "--response-role", "assistant"]
    settings = load(env)
    assert settings.notes == (
        "RAW_OPENAI_OUTPUT is ignored: streams are always vLLM's own server-sent events",
        "DEVICE is ignored: vLLM picks the device itself (the flag is gone)",
        "SCHEDULER_DELAY_FACTOR is ignored: vLLM removed --scheduler-delay-factor",
        "OPENAI_RESPONSE_ROLE is worker-vllm's name for RESPONSE_ROLE (--response-role): "
        "used as such",
        "BASE_PATH=/runpod-volume: models are searched in /runpod-volume/huggingface-cache/hub "
        "first, and downloaded there")
    assert settings.warnings == ()
    assert settings.hub_caches[0] == "/runpod-volume/huggingface-cache/hub"


@pytest.mark.parametrize(("env", "expected"), [
    pytest.param(
        {"MODEL_NAME": "openai/gpt-oss-120b", "MAX_MODEL_LEN": "131072",
         "GPU_MEMORY_UTILIZATION": "0.9", "ENABLE_AUTO_TOOL_CHOICE": "true",
         "TOOL_CALL_PARSER": "openai", "MAX_NUM_SEQS": "64", "ASYNC_SCHEDULING": "true"},
        [*OWN, "--served-model-name", "openai/gpt-oss-120b", "--gpu-memory-utilization",
         "0.9", "--max-model-len", "131072", "--dtype", "bfloat16",
         "--enable-auto-tool-choice", "--tool-call-parser", "openai",
         "--reasoning-parser", "openai_gptoss", "--async-scheduling", "--max-num-seqs", "64"],
        id="gpt-oss-120b-with-tools"),
    pytest.param(
        {"MODEL_NAME": "Qwen/Qwen3-32B-AWQ", "QUANTIZATION": "awq_marlin",
         "ENABLE_PREFIX_CACHING": "true", "MAX_NUM_SEQS": "64", "KV_CACHE_DTYPE": "fp8",
         "DTYPE": "float16", "MAX_MODEL_LEN": "32768", "MAX_NUM_BATCHED_TOKENS": "0"},
        [*OWN, "--served-model-name", "Qwen/Qwen3-32B-AWQ", "--gpu-memory-utilization",
         "0.95", "--max-model-len", "32768", "--dtype", "float16",
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
         "--reasoning-parser", "qwen3", "--enable-prefix-caching", "--kv-cache-dtype", "fp8",
         "--max-num-seqs", "64", "--quantization", "awq_marlin"],
        id="quantized-qwen-prefix-caching"),
    pytest.param(
        {"MODEL_NAME": "meta-llama/Llama-3.1-8B-Instruct", "HF_TOKEN": "hf_abcdefgh",
         "SPECULATIVE_CONFIG": '{"model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", '
                               '"method": "eagle3", "num_speculative_tokens": 3}',
         "MAX_NUM_BATCHED_TOKENS": "8192", "MODEL_REVISION": "0e9e39f",
         "TOKENIZER_NAME": "meta-llama/Llama-3.1-8B-Instruct",
         "CUSTOM_CHAT_TEMPLATE": "/runpod-volume/templates/llama3.jinja"},
        [*OWN, "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
         "--gpu-memory-utilization", "0.95", "--max-model-len", "8192", "--dtype", "bfloat16",
         "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json",
         "--max-num-batched-tokens", "8192", "--speculative-config",
         '{"model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", "method": "eagle3", '
         '"num_speculative_tokens": 3}', "--revision", "0e9e39f",
         "--tokenizer", "meta-llama/Llama-3.1-8B-Instruct",
         "--chat-template", "/runpod-volume/templates/llama3.jinja"],
        id="speculative-decoding-pinned-revision"),
])
def test_realistic_worker_vllm_endpoints_give_the_expected_command(
        env: dict[str, str], expected: list[str]) -> None:
    assert command(env) == expected
    assert "hf_abcdefgh" not in command(env), "the token reaches vLLM by its environment only"
