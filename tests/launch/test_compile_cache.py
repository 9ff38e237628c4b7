"""Where vLLM's compile cache goes: a folder per model on the volume, when it can be."""

from __future__ import annotations

from pathlib import Path

from worker.launch.compile_cache import cache_folder, choose
from worker.launch.plan import plan_launches
from worker.settings.loader import load


def test_the_cache_is_beside_hf_home_one_folder_per_model_and_config(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 128}')
    first = cache_folder(str(tmp_path / "volume" / "huggingface"), "org/My Model", str(model))
    assert first.parent == tmp_path / "volume" / "vllm-cache"
    assert first.name.startswith("org--My--Model-")
    assert cache_folder(str(tmp_path / "volume" / "huggingface"), "org/My Model",
                        str(model)) == first, "stable: the next worker finds it"
    (model / "config.json").write_text('{"hidden_size": 256}')
    assert cache_folder(str(tmp_path / "volume" / "huggingface"), "org/My Model",
                        str(model)) != first, "new weights' config: a new folder"


def test_the_volume_folder_is_chosen_made_and_written_to(tmp_path: Path) -> None:
    root, why = choose({}, True, str(tmp_path / "volume" / "huggingface"), "m", None)
    assert root is not None and Path(root).is_dir() and why.startswith("compile cache on the")
    assert list(Path(root).iterdir()) == [], "the probe file is gone"


def test_a_cache_root_the_user_set_or_turned_off_is_left_alone(tmp_path: Path) -> None:
    root, why = choose({"VLLM_CACHE_ROOT": "/mine"}, True, str(tmp_path / "hf"), "m", None)
    assert root is None and "/mine (VLLM_CACHE_ROOT)" in why
    root, why = choose({}, False, str(tmp_path / "hf"), "m", None)
    assert root is None and "COMPILE_CACHE_ON_VOLUME=false" in why
    assert not (tmp_path / "vllm-cache").exists()


def test_a_volume_that_cannot_be_written_leaves_vllms_default(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")  # the cache's parent would have to be inside a file
    root, why = choose({}, True, str(blocker / "huggingface"), "m", None)
    assert root is None and "vLLM's default" in why and "cannot be written" in why


def test_an_empty_cache_root_means_unset_and_never_reaches_vllm(tmp_path: Path) -> None:
    """vLLM would read an empty VLLM_CACHE_ROOT as the current folder."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    env = {"HF_HOME": str(tmp_path / "volume" / "hf"), "MODEL_PATH": str(model),
           "VLLM_CACHE_ROOT": ""}
    [on_volume] = plan_launches(load(env), env)
    [off] = plan_launches(load({**env, "COMPILE_CACHE_ON_VOLUME": "false"}),
                          {**env, "COMPILE_CACHE_ON_VOLUME": "false"})
    assert on_volume.env["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "volume" / "vllm-cache"))
    assert "VLLM_CACHE_ROOT" not in off.env
