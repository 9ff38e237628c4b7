"""The locator on fabricated folders and Hugging Face cache trees."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from model_locator import GGUF_MESSAGE, LocatorError, check_folder, link_for_vllm, locate

NAME = "openai/gpt-oss-120b"


def model_folder(path: Path, weights: tuple[str, ...] = ("model.safetensors",),
                 config: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text("{}")
    for weight in weights:
        (path / weight).write_bytes(b"\0" * 8)
    return path


def cache_snapshot(hub: Path, repo_folder: str, revision: str, main: bool = True,
                   **kwargs: object) -> Path:
    repo = hub / repo_folder
    snapshot = model_folder(repo / "snapshots" / revision, **kwargs)  # type: ignore[arg-type]
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def find(tmp_path: Path, name: str = NAME, model_path: str | None = None,
         hubs: tuple[str, ...] = ()) -> tuple[str, bool, tuple[str, ...]]:
    home = tmp_path / "hf"
    location = locate(name, model_path, str(home), (str(home / "hub"), *hubs))
    return location.model, location.is_local, location.steps


def test_model_path_is_used_exactly(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "weights")
    model, local, steps = find(tmp_path, model_path=str(folder))
    assert (model, local) == (str(folder), True)
    assert steps == (f"Found model in MODEL_PATH: {folder}",)


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: None, "does not exist"),
    (lambda p: model_folder(p, config=False), "has no config.json"),
    (lambda p: model_folder(p, weights=()), "has no weight files"),
])
def test_a_bad_model_path_fails_naming_the_path_and_what_is_missing(
        tmp_path: Path, make: object, words: str) -> None:
    path = tmp_path / "weights"
    make(path)  # type: ignore[operator]
    with pytest.raises(LocatorError) as failure:
        find(tmp_path, model_path=str(path))
    assert str(path) in str(failure.value) and words in str(failure.value)


@pytest.mark.parametrize("folder", ["gpt-oss-120b", "model-gpt-oss-120b", "model-gpt-oss",
                                    "GPT-OSS-120B", "Model-GPT-OSS"])
def test_custom_folders_under_hf_home_are_found_ignoring_case(tmp_path: Path, folder: str) -> None:
    made = model_folder(tmp_path / "hf" / folder)
    model, local, steps = find(tmp_path)
    assert (model, local) == (str(made), True)
    assert steps[-1] == f"Found model in {made}"


def test_the_exact_name_wins_over_the_family_folder(tmp_path: Path) -> None:
    model_folder(tmp_path / "hf" / "model-gpt-oss")
    exact = model_folder(tmp_path / "hf" / "gpt-oss-120b")
    assert find(tmp_path)[0] == str(exact)


def test_cache_snapshot_named_by_refs_main_is_chosen(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    cache_snapshot(hub, "models--openai--gpt-oss-120b", "bbb", main=False)
    main = cache_snapshot(hub, "models--openai--gpt-oss-120b", "aaa")
    os.utime(main, (time.time() - 100, time.time() - 100))
    model, local, steps = find(tmp_path)
    assert (model, local) == (str(main), True)
    assert steps[-1] == f"Found model in the cache: {main}"


def test_without_refs_main_the_newest_complete_snapshot_is_chosen(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    old = cache_snapshot(hub, "models--openai--gpt-oss-120b", "old", main=False)
    new = cache_snapshot(hub, "models--openai--gpt-oss-120b", "new", main=False)
    broken = cache_snapshot(hub, "models--openai--gpt-oss-120b", "newest", main=False, weights=())
    now = time.time()
    for age, path in ((300, old), (200, new), (100, broken)):
        os.utime(path, (now - age, now - age))
    model, _, steps = find(tmp_path)
    assert model == str(new)
    assert f"skipped snapshot {broken}: it has no weight files (*.safetensors or *.bin)" in steps


def test_a_lowercased_cache_folder_still_matches(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    snapshot = cache_snapshot(hub, "models--qwen--qwen3-8b", "abc")
    assert find(tmp_path, name="Qwen/Qwen3-8B")[0] == str(snapshot)


def test_incomplete_snapshots_are_skipped_with_a_reason(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    snapshot = cache_snapshot(hub, "models--openai--gpt-oss-120b", "abc",
                              weights=("model-00001-of-00002.safetensors",))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    model, local, steps = find(tmp_path)
    assert (model, local) == (NAME, False)
    assert any("incomplete: model-00002-of-00002.safetensors missing" in s for s in steps)


def test_a_snapshot_whose_blob_link_is_broken_is_incomplete(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    snapshot = cache_snapshot(hub, "models--openai--gpt-oss-120b", "abc", weights=())
    os.symlink(tmp_path / "blobs" / "missing", snapshot / "model.safetensors")
    assert "incomplete" in (check_folder(snapshot) or "")
    assert find(tmp_path)[1] is False


def test_other_hub_caches_are_searched_in_order(tmp_path: Path) -> None:
    runpod_cache = tmp_path / "runpod-cache" / "hub"
    snapshot = cache_snapshot(runpod_cache, "models--openai--gpt-oss-120b", "abc")
    model, _, steps = find(tmp_path, hubs=(str(runpod_cache),))
    assert model == str(snapshot)
    assert steps[0].startswith("not in ")


def test_nothing_on_disk_falls_back_to_the_hub_name(tmp_path: Path) -> None:
    model, local, steps = find(tmp_path)
    assert (model, local) == (NAME, False)
    assert steps[-1].startswith(f"not found on disk: {NAME} is downloaded into")
    assert all(step.startswith("not ") for step in steps)


@pytest.mark.parametrize("name", ["unsloth/gpt-oss-20b-GGUF", "some/model.gguf"])
def test_gguf_names_fail_with_a_clear_sentence(tmp_path: Path, name: str) -> None:
    with pytest.raises(LocatorError, match="GGUF weights are not supported"):
        find(tmp_path, name=name)


def test_gguf_files_and_gguf_only_folders_fail(tmp_path: Path) -> None:
    file = tmp_path / "model-Q4.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(LocatorError, match="GGUF"):
        find(tmp_path, model_path=str(file))
    folder = model_folder(tmp_path / "hf" / "gpt-oss-120b", weights=("model-Q4.gguf",))
    assert check_folder(folder) == GGUF_MESSAGE
    with pytest.raises(LocatorError, match="GGUF"):
        find(tmp_path)


def test_a_thousand_cached_models_are_searched_quickly(tmp_path: Path) -> None:
    """The bound is generous: the benchmark reports the real figure."""
    hub = tmp_path / "hf" / "hub"
    for i in range(1000):
        cache_snapshot(hub, f"models--org{i}--model{i}", "abc")
    wanted = cache_snapshot(hub, "models--openai--gpt-oss-120b", "abc")
    started = time.perf_counter()
    assert find(tmp_path)[0] == str(wanted)
    assert time.perf_counter() - started < 1.0


def test_vllm_gets_a_symlink_in_hf_home_named_after_the_model(tmp_path: Path) -> None:
    target = model_folder(tmp_path / "hf" / "hub" / "models--a--b" / "snapshots" / "abc")
    link = link_for_vllm(str(target), str(tmp_path / "hf"), "a/b")
    assert link == str(tmp_path / "hf" / ".links" / "a--b")
    assert os.path.realpath(link) == str(target)
    other = model_folder(tmp_path / "elsewhere")
    assert os.path.realpath(link_for_vllm(str(other), str(tmp_path / "hf"), "a/b")) == str(other)


def test_endpoints_sharing_a_volume_do_not_repoint_each_others_link(tmp_path: Path) -> None:
    first = model_folder(tmp_path / "one")
    second = model_folder(tmp_path / "two")
    link_one = link_for_vllm(str(first), str(tmp_path / "hf"), "org/one")
    link_two = link_for_vllm(str(second), str(tmp_path / "hf"), "org/two")
    assert os.path.realpath(link_one) == str(first)
    assert os.path.realpath(link_two) == str(second)


def test_an_unwritable_hf_home_gets_a_temporary_link(tmp_path: Path) -> None:
    """HF_HOME under a plain file cannot be written by anyone, root included."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    home = blocker / "huggingface"
    target = model_folder(tmp_path / "weights")
    link = link_for_vllm(str(target), str(home), "m")
    assert not link.startswith(str(blocker))
    assert os.path.realpath(link) == str(target)


def test_a_real_model_folder_in_hf_home_is_never_replaced(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    real = model_folder(home / ".links" / "m")
    target = model_folder(tmp_path / "weights")
    link = link_for_vllm(str(target), str(home), "m")
    assert not link.startswith(str(home)) and os.path.realpath(link) == str(target)
    assert (real / "config.json").is_file() and not real.is_symlink()
    assert link_for_vllm(str(real), str(home), "m") == str(real)


def test_a_revision_picks_its_own_snapshot_and_never_another(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    old = "a" * 40
    new = "b" * 40
    cache_snapshot(hub, "models--acme--tiny-7b", old, main=False)
    current = cache_snapshot(hub, "models--acme--tiny-7b", new)
    (hub / "models--acme--tiny-7b" / "refs" / "v1").write_text(old)
    home = str(tmp_path / "hf")

    def at(revision: str | None) -> str:
        return locate("acme/tiny-7b", None, home, (str(hub),), revision).model

    assert at(None) == str(current)
    assert at("v1").endswith(old), "a tag or branch, through refs/"
    assert at(old[:7]).endswith(old), "a commit by its first characters"
    missing = locate("acme/tiny-7b", None, home, (str(hub),), "c" * 40)
    assert not missing.is_local and missing.model == "acme/tiny-7b"
    assert any("no snapshot of revision cccc" in step for step in missing.steps)
    assert "at revision cccc" in missing.steps[-1]
