"""A model on neither the volume nor a cache: the worker fetches it (download.py) before vLLM
starts, where the settings say, then starts vLLM on the folder; as `python handler.py`
runs it, against the stand-in Hub (fakes.hub) and the stand-in vLLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakes.hub import VALID_TOKEN, Hub
from fakes.platform import Platform
from support.workers import CHAT, SERVED, Worker, model_folder, serving
from worker.launch import weights
from worker.settings.loader import load

REPO = "hub-org/tiny-model"


def test_the_download_goes_where_vllm_itself_would_download() -> None:
    assert weights.download_cache(load({"HF_HOME": "/v/hf"}), {}) == "/v/hf/hub"
    env = {"HF_HOME": "/v/hf", "HF_HUB_CACHE": "/v/cache"}
    assert weights.download_cache(load(env), env) == "/v/cache"
    env = {"HF_HOME": "/v/hf", "BASE_PATH": "/runpod-volume"}
    assert weights.download_cache(load(env), env) == "/runpod-volume/huggingface-cache/hub"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """The stand-in Hub serving REPO (a model folder the locator accepts)."""
    root = tmp_path / "hub-root"
    served = model_folder(tmp_path / "made")
    (root / REPO).parent.mkdir(parents=True)
    shutil.copytree(served, root / REPO)
    (root / REPO / "model.safetensors").write_bytes(b"\1" * (3 << 20))
    with Hub(root) as running:
        yield running


def hub_worker(launch: Callable[..., Worker], hub: Hub, **overrides: str) -> Worker:
    return launch(MODEL_PATH="", MODEL_NAME=REPO, OPENAI_SERVED_MODEL_NAME_OVERRIDE=SERVED,
                  HF_ENDPOINT=hub.url, **overrides)


def test_a_model_not_on_disk_is_downloaded_with_progress_then_served_from_its_folder(
        start_workers: Callable[..., Worker], job_platform: Platform, hub: Hub,
        tmp_path: Path) -> None:
    argv_file = tmp_path / "vllm-argv.json"
    worker = serving(hub_worker(start_workers, hub, FAKE_VLLM_ARGV_FILE=str(argv_file)),
                     job_platform)
    job = job_platform.queue_job({"openai_route": "/v1/chat/completions", "openai_input": {
        **CHAT, "max_tokens": 3}})
    result = job_platform.result(job)
    log = worker.log()
    argv = json.loads(argv_file.read_text())
    assert result["output"][0]["object"] == "chat.completion"
    assert f"Downloaded {REPO}: " in log
    assert f"Start-up of {SERVED}: downloaded 3.1 MB in" in log
    served = hub.stats()["served"]
    assert served.get(f"{REPO}/model.safetensors") == 3 << 20, "fetched once, whole"
    snapshot = next((worker.directory / "hf-home" / "hub" / "models--hub-org--tiny-model" /
                     "snapshots").iterdir())
    assert f"Found model in the cache: {snapshot}" in log, "the second plan finds it"
    model = Path(argv[argv.index("--model") + 1])
    assert model.resolve() == snapshot.resolve(), "vLLM is given the folder, not the hub name"


def test_a_gated_model_without_a_token_fails_each_job_with_the_sentence(
        start_workers: Callable[..., Worker], job_platform: Platform, hub: Hub) -> None:
    (hub.root / f"{REPO}.hub.json").write_text(json.dumps({"gated": True}))
    worker = hub_worker(start_workers, hub, FAILED_START_SECONDS="3")
    error = json.loads(job_platform.result(job_platform.queue_job(CHAT), timeout=20)["error"])
    assert error["error"]["code"] == 503 and "HF_TOKEN" in error["error"]["message"]
    assert "gated" in error["error"]["message"]
    assert worker.exit_code(timeout=20) == 1
    assert "HF_TOKEN" in worker.log().strip().splitlines()[-1]


def test_with_the_token_the_gated_model_is_downloaded(
        start_workers: Callable[..., Worker], job_platform: Platform, hub: Hub) -> None:
    (hub.root / f"{REPO}.hub.json").write_text(json.dumps({"gated": True}))
    worker = serving(hub_worker(start_workers, hub, HF_TOKEN=VALID_TOKEN), job_platform)
    assert f"Downloaded {REPO}: " in worker.log()
    assert VALID_TOKEN not in worker.log(), "the token is never logged"
