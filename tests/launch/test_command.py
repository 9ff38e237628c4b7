"""The vLLM command line: both launch forms, the flags from settings, secrets masked."""

from __future__ import annotations

from worker.launch.command import build_command, count_gpus
from worker.launch.parser_choice import Choice
from worker.settings.loader import Settings, load


def command(settings: Settings, weights: str, gpus: int, parsers: Choice | None = None,
            model: int = 0) -> list[str]:
    return build_command(settings, settings.models[model], weights, gpus, parsers)


def test_legacy_form_runs_the_api_server_module_with_vllm_python() -> None:
    argv = command(load({"VLLM_PYTHON": "/opt/vllm/bin/python"}), "/hf/model", 1)
    assert argv[:5] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                        "--model", "/hf/model"]
    flags = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert flags == {"--host": "127.0.0.1", "--port": "8000",
                     "--served-model-name": "openai/gpt-oss-120b",
                     "--gpu-memory-utilization": "0.95", "--max-model-len": "8192",
                     "--dtype": "bfloat16"}


def test_serve_form_and_optional_flags() -> None:
    settings = load({"USE_VLLM_SERVE": "true",
                     "VLLM_EXTRA_ARGS": "--max-num-seqs 64 --enforce-eager",
                     "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "gpt-oss"})
    argv = command(settings, "/hf/model", 4, Choice("openai", "openai_gptoss", ()))
    assert argv[:3] == ["vllm", "serve", "/hf/model"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--tool-call-parser") + 1] == "openai"
    assert argv[argv.index("--reasoning-parser") + 1] == "openai_gptoss"
    assert argv[argv.index("--served-model-name") + 1] == "gpt-oss"
    assert argv[-3:] == ["--max-num-seqs", "64", "--enforce-eager"]


def test_parsers_left_off_add_no_flag() -> None:
    argv = command(load({}), "m", 1, Choice(None, None, ()))
    assert not [a for a in argv if "parser" in a or "tool" in a]


def test_tensor_parallel_defaults_to_every_visible_gpu_and_can_be_set() -> None:
    assert "--tensor-parallel-size" not in command(load({}), "m", 1)
    assert "--tensor-parallel-size" not in command(load({}), "m", 0)
    argv = command(load({"TENSOR_PARALLEL_SIZE": "2"}), "m", 8)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"


def test_gpus_are_counted_from_cuda_visible_devices() -> None:
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert count_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert count_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_no_secret_is_ever_put_on_the_command_line() -> None:
    env = {"HF_TOKEN": "hf_secretvalue", "MODEL_NAME": "meta-llama/Llama-3.1-8B-Instruct"}
    assert "hf_secretvalue" not in " ".join(command(load(env), "m", 1))


def test_each_model_gets_its_port_name_share_and_flags() -> None:
    settings = load({"MODEL_NAMES": "org/chat;org/embed", "VLLM_PORT": "9000",
                     "GPU_MEMORY_UTILIZATION": "0.6;0.3", "MAX_MODEL_LEN": "4096;512",
                     "RUNNER": "auto;pooling", "CONVERT": "auto;embed"})
    chat, embed = command(settings, "/a", 1), command(settings, "/b", 1, model=1)
    flags = [dict(zip(argv[5::2], argv[6::2], strict=False)) for argv in (chat, embed)]
    assert [f["--port"] for f in flags] == ["9000", "9001"]
    assert [f["--served-model-name"] for f in flags] == ["org/chat", "org/embed"]
    assert [f["--gpu-memory-utilization"] for f in flags] == ["0.6", "0.3"]
    assert [f["--max-model-len"] for f in flags] == ["4096", "512"]
    assert "--runner" not in chat and embed[embed.index("--runner") + 1] == "pooling"
    assert embed[embed.index("--convert") + 1] == "embed"
