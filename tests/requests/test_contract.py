"""The job contract (routes.py) as a job sees it, through the handler and the proxy to a
fake vLLM: every input shape, every route, model picking, bad input, answer shapes."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from support import SERVED, job_error, run_job
from worker.requests.contract import ALIASES, UPSTREAM_ROUTES
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.target import Target

CHAT_BODY = {"id": "chatcmpl-1", "object": "chat.completion",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}


def sent_bodies(server: HTTPServer) -> list[dict[str, Any]]:
    return [json.loads(request.data) for request, _ in server.log if request.data]


def test_openai_route_job_is_sent_as_is_with_the_model_filled(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/chat/completions", method="POST").respond_with_json(CHAT_BODY)
    body = {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low",
            "unknown_field": {"kept": True}}
    items = run_job(proxy, {"openai_route": "/v1/chat/completions", "openai_input": body})
    assert items == [CHAT_BODY]
    assert sent_bodies(fake_vllm) == [{"model": SERVED, **body}]


def test_a_model_the_client_names_is_kept(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/completions").respond_with_json({"choices": []})
    run_job(proxy, {"openai_route": "/v1/completions",
                    "openai_input": {"model": "other", "prompt": "x"}})
    assert sent_bodies(fake_vllm)[0]["model"] == "other"


def test_bare_models_route_is_a_get_without_body(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    models = {"object": "list", "data": [{"id": SERVED, "object": "model"}]}
    fake_vllm.expect_request("/v1/models", method="GET").respond_with_json(models)
    assert run_job(proxy, {"openai_route": "/v1/models"}) == [models]
    assert run_job(proxy, {"openai_route": "/models", "openai_input": {}}) == [models]


def test_plain_messages_merge_top_level_fields_and_sampling_params(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(CHAT_BODY)
    messages = [{"role": "user", "content": "hello"}]
    items = run_job(proxy, {"messages": messages, "max_tokens": 256, "temperature": 0.7,
                            "sampling_params": {"temperature": 0.2, "top_p": 0.9}})
    assert items == [CHAT_BODY]
    assert sent_bodies(fake_vllm) == [{"model": SERVED, "messages": messages, "max_tokens": 256,
                                       "temperature": 0.2, "top_p": 0.9}]


def test_plain_prompt_goes_to_completions_without_the_16_token_cap(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/completions").respond_with_json({"choices": []})
    run_job(proxy, {"prompt": "Once upon a time"})
    run_job(proxy, {"prompt": "Once", "sampling_params": {"max_tokens": 7}})
    first, second = sent_bodies(fake_vllm)
    assert first == {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 512}
    assert second["max_tokens"] == 7


def test_plain_input_goes_to_responses_and_openai_route_overrides(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/responses").respond_with_json({"object": "response"})
    fake_vllm.expect_request("/v1/messages").respond_with_json({"type": "message"})
    assert run_job(proxy, {"input": "hi"}) == [{"object": "response"}]
    assert run_job(proxy, {"openai_route": "/v1/messages", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}) == [
        {"type": "message"}]
    assert [r.path for r, _ in fake_vllm.log] == ["/v1/responses", "/v1/messages"]


@pytest.mark.parametrize("route", sorted({**{p: p for p in UPSTREAM_ROUTES}, **ALIASES}))
def test_every_allowed_route_reaches_its_vllm_path(
        fake_vllm: HTTPServer, proxy: Proxy, route: str) -> None:
    path = ALIASES.get(route, route)
    method = UPSTREAM_ROUTES[path][0]
    fake_vllm.expect_request(path, method=method).respond_with_json({"ok": path})
    items = run_job(proxy, {"openai_route": route, "openai_input": {"input": "x"}})
    assert items == [{"ok": path}]
    assert [(r.method, r.path) for r, _ in fake_vllm.log] == [(method, path)]


def test_stored_responses_can_be_fetched_and_cancelled(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/responses/resp_abc123", method="GET").respond_with_json(
        {"id": "resp_abc123"})
    fake_vllm.expect_request("/v1/responses/resp_abc123/cancel", method="POST").respond_with_json(
        {"status": "cancelled"})
    assert run_job(proxy, {"openai_route": "/v1/responses/resp_abc123"}) == [{"id": "resp_abc123"}]
    assert run_job(proxy, {"openai_route": "/v1/responses/resp_abc123/cancel",
                           "openai_input": {}}) == [{"status": "cancelled"}]


HOSTILE = ["/collective_rpc", "/sleep", "/wake_up", "/reset_prefix_cache", "/pause",
           "/v1/load_lora_adapter", "/start_profile", "/metrics", "/health",
           "/v1/../collective_rpc",
           "/v1/chat/completions/../../sleep", "//evil.example/v1/chat/completions",
           "http://evil.example/v1/chat/completions", "/v1/chat%2Fcompletions",
           "/v1/chat/completions?x=1", "/v1/chat/completions#x", "v1/chat/completions", "",
           "/", 42, ["/v1/models"], "/v1/chat/completions\n/sleep", "/%2e%2e/sleep"]


@pytest.mark.parametrize("route", HOSTILE)
def test_routes_outside_the_allowlist_never_reach_vllm(
        fake_vllm: HTTPServer, proxy: Proxy, route: object) -> None:
    error = job_error(run_job(proxy, {"openai_route": route, "openai_input": {"x": 1}}))
    assert error["code"] == 400
    assert "/v1/chat/completions" in error["message"] and "allowed routes" in error["message"]
    assert fake_vllm.log == []


@pytest.mark.parametrize(("job_input", "words"), [
    (None, "must be a JSON object"),
    ("hello", "must be a JSON object"),
    ({}, "no request in it"),
    ({"temperature": 0.5}, "no request in it"),
    ({"openai_input": {"messages": []}}, "needs an openai_route"),
    ({"openai_route": "/v1/chat/completions", "openai_input": "text"}, "openai_input must be"),
    ({"openai_route": "/v1/chat/completions", "openai_input": {}, "messages": []}, "beside"),
    ({"openai_route": "/v1/chat/completions"}, "needs a request body"),
    ({"messages": "hi"}, "messages must be a list"),
    ({"prompt": 5}, "prompt must be"),
    ({"messages": [], "stream": "yes"}, "stream must be true or false"),
    ({"messages": [], "model": 3}, "model must be a string"),
    ({"messages": [], "sampling_params": [1]}, "sampling_params must be"),
    ({"messages": [], "max_batch_size": 0}, "max_batch_size must be"),
    ({"messages": [], "batch_size_growth_factor": "x"}, "batch_size_growth_factor must be"),
    ({"messages": [], "temperature": float("nan")}, "cannot be sent as JSON"),
])
def test_bad_input_fails_with_400_naming_the_problem(
        fake_vllm: HTTPServer, proxy: Proxy, job_input: Any, words: str) -> None:
    error = job_error(run_job(proxy, job_input))
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert words in error["message"]
    assert fake_vllm.log == []


def two_models(fake_vllm: HTTPServer, embed_routes: frozenset[str] | None = None) -> Proxy:
    """A chat model and an embedding model, each on its own (path-prefixed) fake vLLM."""
    base = fake_vllm.url_for("/").rstrip("/")
    embed = embed_routes or frozenset({"/v1/embeddings", "/rerank", "/score", "/v1/models"})
    return Proxy([Target("chat", f"{base}/chat"), Target("embed", f"{base}/embed", embed)],
                 request_timeout=5, pacing=Pacing(0))


def test_the_jobs_model_picks_the_vllm_and_the_first_is_the_default(
        fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    fake_vllm.expect_request("/chat/v1/chat/completions").respond_with_json({"who": "chat"})
    fake_vllm.expect_request("/embed/v1/embeddings").respond_with_json({"who": "embed"})
    assert run_job(proxy, {"messages": []}) == [{"who": "chat"}]
    assert run_job(proxy, {"openai_route": "/v1/embeddings",
                           "openai_input": {"model": "embed", "input": "x"}}) == [{"who": "embed"}]
    assert [json.loads(r.data)["model"] for r, _ in fake_vllm.log] == ["chat", "embed"]


def test_an_unknown_model_is_a_404_listing_the_served_ones(fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    error = job_error(run_job(proxy, {"messages": [], "model": "gpt-4"}))
    assert error["code"] == 404 and error["message"] == (
        "The model `gpt-4` is not served here; served models: chat, embed.")
    assert fake_vllm.log == []


def test_a_job_naming_an_adapter_goes_to_its_bases_vllm_and_the_404_lists_adapters(
        fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    proxy.targets = [proxy.targets[0], replace(proxy.targets[1], adapters=frozenset({"tuned"}))]
    fake_vllm.expect_request("/embed/v1/embeddings").respond_with_json({"who": "embed"})
    assert run_job(proxy, {"input": "x", "model": "tuned"}) == [{"who": "embed"}]
    error = job_error(run_job(proxy, {"messages": [], "model": "tunned"}))
    assert error["code"] == 404 and error["message"] == (
        "The model `tunned` is not served here; served models: chat, embed; LoRA adapters: "
        "tuned.")


def test_models_lists_every_served_model(fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    for name in ("chat", "embed"):
        fake_vllm.expect_request(f"/{name}/v1/models", method="GET").respond_with_json(
            {"object": "list", "data": [{"id": name, "object": "model"}]})
    answer = run_job(proxy, {"openai_route": "/v1/models"})
    assert answer == [{"object": "list", "data": [{"id": "chat", "object": "model"},
                                                  {"id": "embed", "object": "model"}]}]


def test_plain_input_is_embeddings_for_an_embedding_model_and_responses_otherwise(
        fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    fake_vllm.expect_request("/embed/v1/embeddings").respond_with_json({"object": "list"})
    fake_vllm.expect_request("/chat/v1/responses").respond_with_json({"object": "response"})
    assert run_job(proxy, {"input": ["a", "b"], "model": "embed"}) == [{"object": "list"}]
    assert run_job(proxy, {"input": "hi"}) == [{"object": "response"}]
    assert json.loads(fake_vllm.log[0][0].data) == {"model": "embed", "input": ["a", "b"]}


RERANKED = {"id": "score-1", "model": "embed", "usage": {"prompt_tokens": 9, "total_tokens": 9},
            "results": [{"index": 1, "document": {"text": "Paris."}, "relevance_score": 0.9},
                        {"index": 0, "document": {"text": "Bananas."}, "relevance_score": 0.1}]}


@pytest.mark.parametrize("return_docs", [True, False])
def test_the_embedding_workers_rerank_shape_is_answered_in_their_shape(
        fake_vllm: HTTPServer, return_docs: bool) -> None:
    proxy = two_models(fake_vllm)
    fake_vllm.expect_request("/embed/rerank").respond_with_json(RERANKED)
    answer = run_job(proxy, {"model": "embed", "query": "capital of France?",
                             "docs": ["Bananas.", "Paris."], "return_docs": return_docs})
    results = [{"relevance_score": 0.1, "index": 0}, {"relevance_score": 0.9, "index": 1}]
    if return_docs:
        results[0]["document"], results[1]["document"] = "Bananas.", "Paris."
    assert answer == [{"model": "embed", "results": results,
                       "usage": {"prompt_tokens": 9, "total_tokens": 9}}]
    assert json.loads(fake_vllm.log[0][0].data) == {
        "model": "embed", "query": "capital of France?", "documents": ["Bananas.", "Paris."]}


def test_a_route_the_models_vllm_lacks_is_a_404_naming_what_it_serves(
        fake_vllm: HTTPServer) -> None:
    proxy = two_models(fake_vllm)
    error = job_error(run_job(proxy, {"model": "embed", "messages": []}))
    assert error["code"] == 404
    assert error["message"] == ("embed (an embedding or scoring model) does not serve "
                                "/v1/chat/completions; it serves: /rerank, /score, "
                                "/v1/embeddings, /v1/models.")
    assert fake_vllm.log == []


def test_worker_vllms_route_and_body_shape_means_the_same_as_openai_route(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/completions", method="POST").respond_with_json({"ok": 1})
    models = {"object": "list", "data": [{"id": SERVED}]}
    fake_vllm.expect_request("/v1/models", method="GET").respond_with_json(models)
    body = {"prompt": "Once", "max_tokens": 3}
    assert run_job(proxy, {"route": "/v1/completions", "body": body, "method": "POST"}) == [
        {"ok": 1}]
    assert run_job(proxy, {"route": "/v1/completions", "body": body}) == [{"ok": 1}]
    assert run_job(proxy, {"route": "/v1/models"}) == [models]
    assert sent_bodies(fake_vllm) == [{"model": SERVED, **body}] * 2


@pytest.mark.parametrize(("job_input", "words"), [
    ({"route": "/collective_rpc", "body": {}}, "allowed routes"),
    ({"route": "/v1/models", "method": "POST", "body": {"x": 1}}, "takes GET, not POST"),
    ({"route": "/v1/completions", "body": {"prompt": "x"}, "method": "DELETE"},
     "method must be GET or POST"),
    ({"route": "/v1/completions", "body": {"prompt": "x"}, "prompt": "y"}, "inside body"),
])
def test_worker_vllms_shape_is_refused_as_the_openai_route_shape_is(
        fake_vllm: HTTPServer, proxy: Proxy, job_input: dict[str, Any], words: str) -> None:
    error = job_error(run_job(proxy, job_input))
    assert error["code"] == 400 and words in error["message"]
    assert fake_vllm.log == []
