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
from routes import ALIASES, UPSTREAM_ROUTES
from support import SERVED, job_error, run_job, sse

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
    proxy = handler.configure(Proxy(f"http://127.0.0.1:{port}", SERVED, request_timeout=5))
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
    proxy = handler.configure(Proxy(fake_vllm.url_for("/").rstrip("/"), SERVED,
                                    request_timeout=0.3))
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
    proxy = handler.configure(Proxy(fake_vllm.url_for("/").rstrip("/"), SERVED,
                                    request_timeout=0.5, pacing=Pacing(0)))
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
    proxy = handler.configure(Proxy(f"http://127.0.0.1:{port}", SERVED,
                                    upstream_exit=lambda timeout: "killed by SIGKILL"))
    error = job_error(run_job(proxy, {"messages": []}))
    assert error["code"] == 503 and "killed by SIGKILL" in error["message"]


def test_handler_is_an_async_generator_function_the_sdk_detects() -> None:
    import inspect

    assert inspect.isasyncgenfunction(handler.handler)
