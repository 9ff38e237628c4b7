"""On-demand adapters against a fake vLLM: loaded by the worker through vLLM's loopback
route the first time a job names one, then routed to that vLLM; bad ones refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from support import job_error, run_job
from tiny_adapter import build
from worker.requests.adapter_loader import AdapterLoader, OnDemand
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.settings.loader import load
from worker.upstream.target import Target

CHAT = {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapters"
    build(folder / "customer-a", base="alpha")
    build(folder / "customer-b", base="beta")
    build(folder / "too-big", rank=64)
    build(folder / "other-model", hidden=256)
    (folder / "empty").mkdir()
    return folder


def loaded_proxy(fake_vllm: HTTPServer, lora_dir: Path) -> Proxy:
    base = fake_vllm.url_for("/").rstrip("/")
    models = load({"MODEL_NAMES": "org/alpha;org/beta",
                   "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "alpha;beta"}).models
    proxy = Proxy([Target("alpha", f"{base}/a"), Target("beta", f"{base}/b")],
                  request_timeout=5, pacing=Pacing(0))
    sizes = {"hidden": 128, "attention": 128, "mlp": 256}
    proxy.loader = AdapterLoader(proxy, OnDemand(str(lora_dir), 16, models,
                                                 {"alpha": sizes, "beta": sizes}))
    return proxy


def loads(fake_vllm: HTTPServer) -> list[tuple[str, dict[str, str]]]:
    return [(r.path, json.loads(r.data)) for r, _ in fake_vllm.log
            if r.path.endswith("/v1/load_lora_adapter")]


def test_the_first_job_naming_an_adapter_loads_it_into_its_bases_vllm_once(
        fake_vllm: HTTPServer, lora_dir: Path) -> None:
    for prefix in ("/a", "/b"):
        fake_vllm.expect_request(f"{prefix}/v1/load_lora_adapter", method="POST"
                                 ).respond_with_data("Success")
        fake_vllm.expect_request(f"{prefix}/v1/chat/completions").respond_with_json(CHAT)
    proxy = loaded_proxy(fake_vllm, lora_dir)
    job = {"messages": [{"role": "user", "content": "hi"}], "model": "customer-b"}

    assert run_job(proxy, job) == [CHAT]
    assert run_job(proxy, job) == [CHAT]

    assert loads(fake_vllm) == [("/b/v1/load_lora_adapter", {
        "lora_name": "customer-b", "lora_path": str(lora_dir / "customer-b")})]
    chats = [r for r, _ in fake_vllm.log if r.path.endswith("/chat/completions")]
    assert [r.path for r in chats] == ["/b/v1/chat/completions"] * 2, "beta's vLLM"
    assert [t.adapters for t in proxy.targets] == [frozenset(), frozenset({"customer-b"})]


@pytest.mark.parametrize(("name", "status", "words"), [
    ("too-big", 400, "rank 64, above this worker's MAX_LORA_RANK=16: set MAX_LORA_RANK to 64"),
    ("other-model", 400, "trained for another architecture"),
    ("empty", 400, "has no adapter_config.json"),
    ("nobody", 404, "served models: alpha, beta"),
    ("../adapters/customer-a", 404, "served models"),
    ("/etc", 404, "served models"),
])
def test_a_name_that_is_no_good_adapter_gets_a_4xx_naming_it_and_loads_nothing(
        fake_vllm: HTTPServer, lora_dir: Path, name: str, status: int, words: str) -> None:
    proxy = loaded_proxy(fake_vllm, lora_dir)
    error = job_error(run_job(proxy, {"messages": [], "model": name}))
    assert error["code"] == status and words in error["message"]
    assert fake_vllm.log == []


def test_vllm_refusing_the_load_is_the_jobs_error(fake_vllm: HTTPServer, lora_dir: Path) -> None:
    fake_vllm.expect_request("/a/v1/load_lora_adapter", method="POST").respond_with_json(
        {"error": {"message": "Invalid LoRA adapter", "type": "BadRequestError",
                   "code": 400}}, status=400)
    proxy = loaded_proxy(fake_vllm, lora_dir)
    error = job_error(run_job(proxy, {"messages": [], "model": "customer-a"}))
    assert error["code"] == 400
    assert error["message"] == "LoRA adapter customer-a could not be loaded: Invalid LoRA adapter"
    assert proxy.targets[0].adapters == frozenset(), "not routed: it is not loaded"


def test_names_that_are_no_folder_of_lora_dir_leave_nothing_behind(
        fake_vllm: HTTPServer, lora_dir: Path) -> None:
    """Clients may send any model name: none may cost the worker memory for good."""
    proxy = loaded_proxy(fake_vllm, lora_dir)
    for number in range(50):
        assert job_error(run_job(proxy, {"messages": [], "model": f"typo-{number}"}))["code"] \
            == 404
    assert proxy.loader is not None and not proxy.loader._locks  # type: ignore[attr-defined]
