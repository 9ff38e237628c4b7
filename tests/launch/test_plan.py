"""Planning each vLLM launch: the weights' link, the parsers, the context length."""

from __future__ import annotations

import json
import os
from pathlib import Path

from worker.launch.plan import child_env, plan_launches
from worker.settings.loader import load


def model_folder(path: Path, config: dict[str, object]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0")
    return path


def test_an_embedding_model_gets_no_parsers_and_its_own_context_length(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    model_folder(home / "tiny-chat", {"architectures": ["LlamaForCausalLM"],
                                      "model_type": "llama", "max_position_embeddings": 32768})
    model_folder(home / "all-MiniLM-L6-v2", {"architectures": ["BertModel"], "model_type": "bert",
                                             "max_position_embeddings": 512})
    settings = load({"MODEL_NAMES": "tiny-chat;sentence-transformers/all-MiniLM-L6-v2",
                     "HF_HOME": str(home), "TOOL_CALL_PARSER": "hermes"})
    chat, embed = plan_launches(settings, {})
    assert chat.argv[chat.argv.index("--max-model-len") + 1] == "8192"
    assert "--tool-call-parser" in chat.argv
    assert embed.argv[embed.argv.index("--max-model-len") + 1] == "512"
    assert "--tool-call-parser" not in embed.argv and "--reasoning-parser" not in embed.argv
    assert any("does not generate text (BertModel)" in r for r in embed.parsers.reasons)
    assert (chat.weights, embed.weights) == (
        str(home / ".links" / "tiny-chat"),
        str(home / ".links" / "sentence-transformers--all-MiniLM-L6-v2"))
    assert os.path.realpath(embed.weights) == str(home / "all-MiniLM-L6-v2")


def test_an_explicit_context_length_is_kept(tmp_path: Path) -> None:
    model_folder(tmp_path / "hf" / "small", {"architectures": ["BertModel"],
                                             "max_position_embeddings": 512})
    settings = load({"MODEL_NAME": "org/small", "HF_HOME": str(tmp_path / "hf"),
                     "MAX_MODEL_LEN": "1024"})
    [launch] = plan_launches(settings, {})
    assert launch.argv[launch.argv.index("--max-model-len") + 1] == "1024"


def test_the_child_environment_keeps_vllms_variables_and_drops_the_workers() -> None:
    env = {"VLLM_PORT": "8000", "VLLM_PYTHON": "/x", "LOCAL_API_KEY": "k",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_TOKEN": "hf_x", "PATH": "/bin"}
    assert child_env(env, load(env)) == {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_TOKEN": "hf_x",
                                         "PATH": "/bin", "HF_HOME": "/runpod-volume/huggingface"}


def test_worker_vllms_base_path_is_where_vllm_downloads_unless_a_hub_cache_is_set() -> None:
    env = {"BASE_PATH": "/runpod-volume", "HF_HOME": "/data/hf"}
    assert child_env(env, load(env))["HF_HUB_CACHE"] == "/runpod-volume/huggingface-cache/hub"
    chosen = {**env, "HF_HUB_CACHE": "/data/cache"}
    assert child_env(chosen, load(chosen))["HF_HUB_CACHE"] == "/data/cache"
    assert load(env).hub_caches[0] == "/runpod-volume/huggingface-cache/hub", "searched first"


def test_sentence_transformers_max_seq_length_caps_the_context(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "hf" / "all-MiniLM-L6-v2",
                          {"architectures": ["BertModel"], "max_position_embeddings": 512})
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    settings = load({"MODEL_NAME": "sentence-transformers/all-MiniLM-L6-v2",
                     "HF_HOME": str(tmp_path / "hf")})
    [launch] = plan_launches(settings, {})
    assert launch.argv[launch.argv.index("--max-model-len") + 1] == "256"
