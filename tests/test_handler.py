"""The handler against a fake vLLM: every shape, every route, streams, errors, cancellation."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

import handler
from proxy import Proxy
from relay import Pacing
from routes import ALIASES, UPSTREAM_ROUTES, Target
from support import SERVED, job_error, proxy_to, run_job, sse

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


def test_upstream_errors_keep_vllms_message_and_status(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    vllm_error = {"error": {"message": "The model `nope` does not exist. Valid aliases: x",
                            "type": "NotFoundError", "param": "model", "code": 404}}
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(vllm_error, status=404)
    items = run_job(proxy, {"messages": [], "model": "nope", "stream": True})
    assert len(items) == 1
    assert job_error(items) == vllm_error["error"]


def test_a_tools_request_to_a_vllm_without_tool_calling_says_how_to_fix_it(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    message = ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
               'to be set')
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}},
        status=400)
    error = job_error(run_job(proxy, {"messages": [], "tools": [{"type": "function"}]}))
    assert error["code"] == 400 and error["message"].startswith(message)
    assert "TOOL_CALL_PARSER" in error["message"] and "Builtin Tools" in error["message"]


def test_a_non_json_error_body_is_quoted(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/completions").respond_with_data("Internal Server Error",
                                                                   status=500)
    error = job_error(run_job(proxy, {"prompt": "x"}))
    assert error["code"] == 500 and "Internal Server Error" in error["message"]


def test_a_non_json_success_body_is_a_502(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/completions").respond_with_data("<html>oops</html>")
    error = job_error(run_job(proxy, {"prompt": "x"}))
    assert error["code"] == 502 and "not JSON" in error["message"]


def test_unreachable_vllm_is_a_503() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = handler.configure(Proxy(Target(SERVED, f"http://127.0.0.1:{port}"), request_timeout=5))
    error = job_error(run_job(proxy, {"messages": []}))
    assert error["code"] == 503 and "not reachable" in error["message"]


def test_a_refusing_worker_answers_503_without_calling_vllm(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    proxy.refusal = "vLLM killed by SIGKILL; the worker is restarting"
    error = job_error(run_job(proxy, {"messages": []}))
    assert error == {"message": "vLLM killed by SIGKILL; the worker is restarting",
                     "type": "ServiceUnavailableError", "param": None, "code": 503}
    assert fake_vllm.log == []


def chat_stream(n: int) -> list[bytes]:
    payloads = [{"choices": [{"delta": {"content": f"tok é世 {i}"}}]} for i in range(n)]
    events = [f"data: {json.dumps(p, ensure_ascii=False)}\n\n" for p in payloads]
    usage = f'data: {{"choices": [], "usage": {{"completion_tokens": {n}}}}}\n\n'
    return [e.encode() for e in events] + [usage.encode(), b"data: [DONE]\n\n"]


def odd_splits(chunks: list[bytes], size: int) -> list[bytes]:
    body = b"".join(chunks)
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 3, 17, 100000])
def test_streams_are_relayed_byte_exact_in_whole_events(
        fake_vllm: HTTPServer, proxy: Proxy, size: int) -> None:
    chunks = chat_stream(50)
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        sse(odd_splits(chunks, size)))
    items = run_job(proxy, {"openai_route": "/v1/chat/completions",
                            "openai_input": {"messages": [], "stream": True,
                                             "stream_options": {"include_usage": True}}})
    assert all(isinstance(item, str) and item.endswith("\n\n") for item in items)
    assert "".join(items).encode() == b"".join(chunks)


def test_a_stream_cut_mid_event_ends_with_an_in_band_502(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        sse([b"data: {\"a\": 1}\n\n", b"data: {\"trunc"]))
    items = run_job(proxy, {"messages": [], "stream": True})
    assert items[0] == "data: {\"a\": 1}\n\n"
    error_event = items[-1]
    assert error_event.endswith("data: [DONE]\n\n")
    payload = json.loads(error_event.split("\n\n")[0].removeprefix("data: "))
    assert payload["error"]["code"] == 502 and "middle of an event" in payload["error"]["message"]


def test_a_responses_stream_error_uses_the_responses_event_format(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/responses").respond_with_response(
        sse([b"event: response.created\ndata: {}\n\n", b"event: response.out"]))
    items = run_job(proxy, {"input": "x", "stream": True})
    assert items[-1].startswith("event: error\ndata: ")
    assert json.loads(items[-1].split("data: ", 1)[1])["type"] == "error"


def test_a_stream_that_fails_before_any_event_fails_the_job(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(sse([b"data: {\"x"]))
    error = job_error(run_job(proxy, {"messages": [], "stream": True}))
    assert error["code"] == 502


def test_silent_vllm_times_out_with_504_naming_the_setting(fake_vllm: HTTPServer) -> None:
    release = threading.Event()

    def hang(request: Request) -> Response:
        release.wait(10)
        return Response("{}", content_type="application/json")

    fake_vllm.expect_request("/v1/chat/completions").respond_with_handler(hang)
    proxy = handler.configure(proxy_to(fake_vllm, request_timeout=0.3))
    try:
        error = job_error(run_job(proxy, {"messages": []}))
    finally:
        release.set()
    assert error["code"] == 504 and "REQUEST_TIMEOUT" in error["message"]


def test_a_long_but_live_stream_is_not_cut_by_the_request_timeout(fake_vllm: HTTPServer) -> None:
    def slow() -> Iterator[bytes]:
        for i in range(8):
            time.sleep(0.1)  # the upstream's pace: 0.8 s in all, each gap under the timeout
            yield f"data: {i}\n\n".encode()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(slow(), content_type="text/event-stream"))
    proxy = handler.configure(proxy_to(fake_vllm, request_timeout=0.5, pacing=Pacing(0)))
    items = run_job(proxy, {"messages": [], "stream": True})
    assert "".join(items) == "".join(f"data: {i}\n\n" for i in range(8))


def test_cancelling_a_job_closes_the_vllm_connection(fake_vllm: HTTPServer, proxy: Proxy) -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"data: {\"choices\": [{\"delta\": {\"content\": \"x\"}}]}\n\n"
                time.sleep(0.01)
        finally:
            closed.set()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(endless(), content_type="text/event-stream"))

    async def cancel_after_first_yield() -> None:
        generator = handler.handler({"id": "c", "input": {"messages": [], "stream": True}})
        task = asyncio.ensure_future(anext(generator))
        assert (await task).startswith("data: ")
        consumer = asyncio.create_task(anext(generator))
        await asyncio.sleep(0)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await generator.aclose()
        await proxy.aclose()

    asyncio.run(cancel_after_first_yield())
    assert closed.wait(1), "the fake vLLM kept streaming to a cancelled job"


def test_a_consumer_that_stops_reading_closes_the_vllm_connection(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b"data: {}\n\n"
                time.sleep(0.01)
        finally:
            closed.set()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(endless(), content_type="text/event-stream"))

    async def read_two_then_stop() -> None:
        generator = handler.handler({"id": "s", "input": {"messages": [], "stream": True}})
        await anext(generator)
        await anext(generator)
        await generator.aclose()
        await proxy.aclose()

    asyncio.run(read_two_then_stop())
    assert closed.wait(1)


def test_when_vllm_died_the_connection_error_is_a_503(fake_vllm: HTTPServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = handler.configure(Proxy(Target(SERVED, f"http://127.0.0.1:{port}"),
                                    upstream_exit=lambda timeout: "killed by SIGKILL"))
    error = job_error(run_job(proxy, {"messages": []}))
    assert error["code"] == 503 and "killed by SIGKILL" in error["message"]


def test_handler_is_an_async_generator_function_the_sdk_detects() -> None:
    import inspect

    assert inspect.isasyncgenfunction(handler.handler)


def two_models(fake_vllm: HTTPServer, embed_routes: frozenset[str] | None = None) -> Proxy:
    """A chat model and an embedding model, each on its own (path-prefixed) fake vLLM."""
    base = fake_vllm.url_for("/").rstrip("/")
    embed = embed_routes or frozenset({"/v1/embeddings", "/rerank", "/score", "/v1/models"})
    return handler.configure(Proxy([Target("chat", f"{base}/chat"),
                                    Target("embed", f"{base}/embed", embed)],
                                   request_timeout=5, pacing=Pacing(0)))


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
