"""LoRA adapters end to end on the real vLLM (CPU build): one worker serving two models
(the tiny chat model under two names, each on its own vLLM), with tiny adapters built
here offline: one given as a hub repo id and found in the Hugging Face cache with
HF_HUB_OFFLINE=1, one as a folder, one loaded on demand from LORA_DIR. An adapter's greedy
text must differ from its base's and equal what its vLLM answers when asked directly."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from support import run_readme_example
from support.readme_checks import LORA_EXAMPLES
from support.real_vllm import (
    LOCAL_KEY,
    REPO,
    SHARED_CACHE,
    RealEndpoint,
    health_200,
    make_target,
)
from tiny_adapter import build

HELLO = [{"role": "user", "content": "Tell me about the sea"}]
GREEDY: dict[str, Any] = {"max_tokens": 12, "temperature": 0}
BASES = {"support-bot": "tiny-chat", "support-v2": "tiny-chat", "twin-b": "tiny-twin",
         "customer-42": "tiny-twin"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEndpoint]:
    tmp = tmp_path_factory.mktemp("lora")
    home = tmp / "hf"
    tiny = os.environ.get("TINY_MODEL_PATH", str(REPO / ".models" / "tiny-chat"))
    home.mkdir()
    for name in ("tiny-chat", "tiny-twin"):  # folders on the volume, named after the models
        (home / name).symlink_to(tiny)
    repo = home / "hub" / "models--acme--support-bot-lora"
    build(repo / "snapshots" / "0a1b2c", seed=11)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0a1b2c")
    build(home / "support-v2", seed=14)  # a folder under HF_HOME, named by its folder name
    build(tmp / "twin-b", seed=12, base="tiny-twin")
    build(tmp / "adapters" / "customer-42", seed=13, base="tiny-twin")
    (tmp / "adapters" / "broken").mkdir()
    modules = [{"name": "support-bot", "path": "acme/support-bot-lora",
                "base_model_name": "tiny-chat"},
               {"name": "support-v2", "path": "support-v2"},  # two on one vLLM
               {"name": "twin-b", "path": str(tmp / "twin-b")}]  # its config names its base
    with make_target("run", tmp, "local", health_200, LOCAL_API_KEY=LOCAL_KEY,
                     MODEL_NAMES="tiny-chat;tiny-twin", LORA_MODULES=json.dumps(modules),
                     LORA_DIR=str(tmp / "adapters"), MAX_LORAS="2", **SHARED_CACHE) as served:
        yield served


def vllm_of(endpoint: RealEndpoint, base: str) -> str:
    """The URL of the vLLM serving `base` (the second model's is on the next port)."""
    host, port = endpoint.vllm_url.rsplit(":", 1)
    return f"{host}:{int(port) + (base == 'tiny-twin')}"


def direct(endpoint: RealEndpoint, base: str, model: str) -> str:
    """The greedy chat text `base`'s vLLM gives for `model` when asked directly."""
    answer = httpx.post(f"{vllm_of(endpoint, base)}/v1/chat/completions", timeout=120,
                        json={"model": model, "messages": HELLO, **GREEDY})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["message"]["content"])


def listed(url: str, **headers: str) -> list[tuple[str, str | None]]:
    models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
    return [(m["id"], m["parent"]) for m in models]


@pytest.fixture(scope="module")
def client(endpoint: RealEndpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint.openai_base, api_key=endpoint.api_key,
                         max_retries=0)


def test_models_lists_each_base_and_its_adapters_each_on_its_own_vllm(
        endpoint: RealEndpoint) -> None:
    through = [m for m in listed(f"{endpoint.url}/openai", **endpoint.headers)
               if m[0] != "customer-42"]  # once loaded on demand (below), listed too
    assert through == [("tiny-chat", None), ("support-bot", "tiny-chat"),
                       ("support-v2", "tiny-chat"), ("tiny-twin", None), ("twin-b", "tiny-twin")]
    assert ("support-bot", "tiny-chat") in listed(vllm_of(endpoint, "tiny-chat"))
    assert ("twin-b", "tiny-twin") in listed(vllm_of(endpoint, "tiny-twin"))
    assert ("twin-b", "tiny-twin") not in listed(vllm_of(endpoint, "tiny-chat"))


@pytest.mark.parametrize("adapter", ["support-bot", "support-v2", "twin-b"])
def test_an_adapter_answers_as_its_vllm_does_on_every_path_and_unlike_its_base(
        endpoint: RealEndpoint, client: openai.OpenAI, adapter: str) -> None:
    base = BASES[adapter]
    expected = direct(endpoint, base, adapter)
    assert expected != direct(endpoint, base, base), "the adapter changes greedy output"

    whole = client.chat.completions.create(model=adapter, messages=HELLO, **GREEDY)
    streamed = client.chat.completions.create(model=adapter, messages=HELLO, stream=True,
                                              **GREEDY)
    pieces = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    job = httpx.post(f"{endpoint.url}/runsync", headers=endpoint.headers, timeout=120,
                     json={"input": {"model": adapter, "messages": HELLO, **GREEDY}}).json()

    assert whole.model == adapter and whole.choices[0].message.content == expected
    assert pieces == expected
    assert job["status"] == "COMPLETED", job
    assert job["output"][0]["choices"][0]["message"]["content"] == expected


def test_anthropic_messages_naming_an_adapter_answer_as_its_vllm_does(
        endpoint: RealEndpoint) -> None:
    claude = anthropic.Anthropic(base_url=endpoint.anthropic_base, api_key=endpoint.api_key,
                                 max_retries=0)
    message = claude.messages.create(model="twin-b", messages=HELLO, max_tokens=12,
                                     extra_body={"temperature": 0})
    vllm = httpx.post(f"{vllm_of(endpoint, 'tiny-twin')}/v1/messages", timeout=120,
                      json={"model": "twin-b", "messages": HELLO, "max_tokens": 12,
                            "temperature": 0}).json()
    assert message.model == "twin-b"
    assert [b.text for b in message.content if b.type == "text"] == [
        b["text"] for b in vllm["content"] if b["type"] == "text"]


def test_an_adapter_of_lora_dir_loads_on_first_use_into_its_bases_vllm(
        endpoint: RealEndpoint, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="customer-42", messages=HELLO, **GREEDY)

    assert answer.choices[0].message.content == direct(endpoint, "tiny-twin", "customer-42")
    assert answer.choices[0].message.content != direct(endpoint, "tiny-twin", "tiny-twin")
    assert ("customer-42", "tiny-twin") in listed(f"{endpoint.url}/openai", **endpoint.headers)
    assert ("customer-42", "tiny-twin") not in listed(vllm_of(endpoint, "tiny-chat"))
    assert "LoRA adapter customer-42 loaded from" in endpoint.log_text()


def test_a_broken_or_unknown_adapter_is_a_4xx_naming_it_and_the_rest_goes_on(
        endpoint: RealEndpoint, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as broken:
        client.chat.completions.create(model="broken", messages=HELLO, **GREEDY)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="support-bott", messages=HELLO, **GREEDY)

    assert "LoRA adapter broken" in broken.value.message
    assert "has no adapter_config.json" in broken.value.message
    assert "served models: tiny-chat, tiny-twin; LoRA adapters: " in unknown.value.message
    assert "support-bot, support-v2, twin-b" in unknown.value.message
    after = client.chat.completions.create(model="support-bot", messages=HELLO, **GREEDY)
    assert after.choices[0].message.content == direct(endpoint, "tiny-chat", "support-bot")


@pytest.mark.parametrize("name", sorted(LORA_EXAMPLES))
def test_readme_lora_examples_run(endpoint: RealEndpoint, name: str) -> None:
    LORA_EXAMPLES[name](run_readme_example(name, endpoint.url, endpoint.api_key))
