"""LoRA adapters before anything starts: found like weights, checked, routed, their flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_adapter import build
from worker.launch.plan import plan_launches
from worker.settings.loader import SettingsError, load


def model(folder: Path, hidden: int = 128) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 256, "num_attention_heads": 2, "head_dim": 64}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return folder


def launches(tmp_path: Path, **env: str) -> list[object]:
    base = {"HF_HOME": str(tmp_path / "hf"), "MODEL_PATH": str(model(tmp_path / "tiny-chat"))}
    return plan_launches(load({**base, **env}), {})


def lora_args(argv: list[str]) -> list[str]:
    start = argv.index("--enable-lora")
    return argv[start:]


def test_adapters_in_vllms_form_become_flags_with_their_resolved_paths(tmp_path: Path) -> None:
    first, second = build(tmp_path / "a", seed=1), build(tmp_path / "b", seed=2)
    [launch] = launches(tmp_path, LORA_MODULES=f"first={first} second={second}")
    flags = lora_args(launch.argv)
    assert flags.count("--lora-modules") == 1, "vLLM keeps only the last --lora-modules"
    start = flags.index("--lora-modules") + 1
    modules = [json.loads(arg) for arg in flags[start:start + 2]]
    assert modules == [{"name": "first", "path": str(first), "base_model_name": "tiny-chat"},
                       {"name": "second", "path": str(second), "base_model_name": "tiny-chat"}]
    assert "--max-lora-rank" not in launch.argv, "rank 8 fits vLLM's default 16"
    assert [a.rank for a in launch.adapters] == [8, 8]


def test_worker_vllms_json_form_and_a_folder_under_hf_home(tmp_path: Path) -> None:
    build(tmp_path / "hf" / "support-bot")
    modules = json.dumps([{"name": "bot", "path": "support-bot", "base_model_name": "tiny-chat"}])
    [launch] = launches(tmp_path, LORA_MODULES=modules)
    assert launch.adapters[0].path == str(tmp_path / "hf" / "support-bot")
    assert "in HF_HOME" in launch.adapters[0].found


def test_a_repo_id_is_found_in_the_hugging_face_cache_without_a_download(tmp_path: Path) -> None:
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-adapter"
    build(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    [launch] = launches(tmp_path, LORA_MODULES="cached=acme/tiny-adapter")
    assert launch.adapters[0].path == str(repo / "snapshots" / "abc123")
    with pytest.raises(SettingsError, match="downloads no adapter"):
        launches(tmp_path / "other", LORA_MODULES="missing=acme/not-there")


def test_a_rank_above_the_default_raises_max_lora_rank_or_is_refused_when_set(
        tmp_path: Path) -> None:
    big = build(tmp_path / "big", rank=40)
    [launch] = launches(tmp_path, LORA_MODULES=f"big={big}")
    assert lora_args(launch.argv)[1:3] == ["--max-lora-rank", "64"]
    assert any("MAX_LORA_RANK 64: the largest adapter's rank is 40" in r for r in launch.reasons)
    with pytest.raises(SettingsError) as refused:
        launches(tmp_path / "again", LORA_MODULES=f"big={big}", MAX_LORA_RANK="32")
    assert str(refused.value) == ("LoRA adapter big has rank 40, above MAX_LORA_RANK=32: set "
                                  "MAX_LORA_RANK to 64 or more.")


def test_an_adapter_goes_to_the_base_it_names_or_was_trained_on(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    env = {"HF_HOME": str(home), "MODEL_NAMES": f"{model(tmp_path / 'a')};{model(tmp_path / 'b')}",
           "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alpha;beta"}
    named = build(tmp_path / "named")
    trained = build(tmp_path / "trained", base="beta")
    plain = build(tmp_path / "plain", base="someone/else")
    modules = json.dumps([{"name": "n", "path": str(named), "base_model_name": "beta"},
                          {"name": "t", "path": str(trained)}, {"name": "p", "path": str(plain)}])
    alpha, beta = plan_launches(load({**env, "LORA_MODULES": modules}), {})
    assert [a.name for a in alpha.adapters] == ["p"], "no base known: the first model"
    assert [a.name for a in beta.adapters] == ["n", "t"]
    with pytest.raises(SettingsError, match="names the base 'gamma', which is not served"):
        wrong = json.dumps([{"name": "x", "path": str(named), "base_model_name": "gamma"}])
        plan_launches(load({**env, "LORA_MODULES": wrong}), {})


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "has no adapter_config.json"),
    (lambda p: ((p / "adapter_model.safetensors").unlink(), p)[1] if build(p) else p,
     "has no adapter_model.safetensors or adapter_model.bin"),
    (lambda p: build(p, hidden=256), "trained for another architecture"),
])
def test_a_bad_adapter_stops_the_start_naming_it(tmp_path: Path, make: object,
                                                 words: str) -> None:
    folder = make(tmp_path / "broken")  # type: ignore[operator]
    with pytest.raises(SettingsError) as refused:
        launches(tmp_path, LORA_MODULES=f"broken={folder}")
    assert words in str(refused.value) and "broken" in str(refused.value)


@pytest.mark.parametrize(("modules", "words"), [
    ("[{\"name\": \"x\"", "not valid JSON"),
    ('[{"name": "x"}]', '{"name": ..., "path": ...}'),
    ("justaname", "give name=path"),
    ("tiny-chat=/x", "not a served model's name"),
])
def test_an_unreadable_lora_modules_names_what_is_wrong(tmp_path: Path, modules: str,
                                                        words: str) -> None:
    with pytest.raises(SettingsError, match=words.replace("{", r"\{").replace("}", r"\}")):
        launches(tmp_path, LORA_MODULES=modules)


def test_a_lora_dir_turns_lora_on_for_loading_on_demand(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    [launch] = launches(tmp_path, LORA_DIR=str(tmp_path / "adapters"))
    assert lora_args(launch.argv) == ["--enable-lora"]
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    with pytest.raises(SettingsError, match="LORA_DIR=/nowhere is not a folder"):
        load({"LORA_DIR": "/nowhere"})
    with pytest.raises(SettingsError, match="ENABLE_LORA=false, but LORA_MODULES"):
        load({"ENABLE_LORA": "false", "LORA_MODULES": "a=/x"})


def test_with_a_lora_dir_only_a_model_that_generates_text_gets_lora(tmp_path: Path) -> None:
    """vLLM's embedding and scoring models take no adapters: --enable-lora is theirs only."""
    (tmp_path / "adapters").mkdir()
    chat = model(tmp_path / "chat")
    embedder = tmp_path / "embedder"
    embedder.mkdir()
    (embedder / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                      "model_type": "bert"}))
    (embedder / "model.safetensors").write_bytes(b"\0" * 8)
    planned = plan_launches(load({"HF_HOME": str(tmp_path / "hf"), "LORA_DIR": str(
        tmp_path / "adapters"), "MODEL_NAMES": f"{chat};{embedder}"}), {})
    assert lora_args(planned[0].argv) == ["--enable-lora"]
    assert "--enable-lora" not in planned[1].argv
    assert any(r.endswith("/embedder generates no text: no LoRA adapters for it")
               for r in planned[1].reasons)
