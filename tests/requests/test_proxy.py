"""The proxy's I/O against a fake vLLM: vLLM's errors kept, streams relayed byte for
byte, in-band errors, timeouts, an unreachable or dead vLLM, cancellation."""

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

from handler import make_handler
from support import SERVED, job_error, proxy_to, run_job, sse
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.target import Target


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
    proxy = Proxy(Target(SERVED, f"http://127.0.0.1:{port}"), request_timeout=5)
    error = job_error(run_job(proxy, {"messages": []}))
    assert error["code"] == 503 and "not reachable" in error["message"]


def test_a_refusing_worker_answers_503_without_calling_vllm(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    proxy.refuse("vLLM killed by SIGKILL; the worker is restarting")
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


def test_a_direct_consumer_learns_of_the_stream_at_once_then_gets_each_event_as_it_comes(
) -> None:
    """`Pacing(direct=True)` (the local endpoint's OpenAI path): an empty item as soon as
    vLLM's answer is known to be a stream, before its first event; then every event the
    moment it arrives, even with a flush interval of a minute; a failure in band."""
    taken = threading.Semaphore(0)  # released each time the consumer has an item
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for i in range(3):
                assert taken.acquire(timeout=10), "the consumer was not given the last item"
                event = f"data: {{\"i\": {i}}}\n\n".encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            assert taken.acquire(timeout=10)
            conn.sendall(b"d\r\ndata: {\"trunc\r\n0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    proxy = Proxy(Target(SERVED, f"http://127.0.0.1:{server.getsockname()[1]}"),
                  pacing=Pacing(flush_interval=60))

    async def drive() -> list[str]:
        got: list[str] = []
        handler = make_handler(proxy, Pacing(direct=True))
        try:
            async for item in handler({"id": "j", "input": {"messages": [], "stream": True}}):
                got.append(item)
                taken.release()
        finally:
            await proxy.aclose()
            server.close()
        return got

    items = asyncio.run(asyncio.wait_for(drive(), 30))
    assert items[:4] == ["", 'data: {"i": 0}\n\n', 'data: {"i": 1}\n\n', 'data: {"i": 2}\n\n']
    assert len(items) == 5 and json.loads(items[4].split("\n\n")[0][6:])["error"]["code"] == 502


def test_silent_vllm_times_out_with_504_naming_the_setting(fake_vllm: HTTPServer) -> None:
    release = threading.Event()

    def hang(request: Request) -> Response:
        release.wait(10)
        return Response("{}", content_type="application/json")

    fake_vllm.expect_request("/v1/chat/completions").respond_with_handler(hang)
    proxy = proxy_to(fake_vllm, request_timeout=0.3)
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
    proxy = proxy_to(fake_vllm, request_timeout=0.5, pacing=Pacing(0))
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
        generator = make_handler(proxy)({"id": "c", "input": {"messages": [], "stream": True}})
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
        generator = make_handler(proxy)({"id": "s", "input": {"messages": [], "stream": True}})
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
    proxy = Proxy(Target(SERVED, f"http://127.0.0.1:{port}"),
                  upstream_exit=lambda timeout: "killed by SIGKILL")
    error = job_error(run_job(proxy, {"messages": []}))
    assert error["code"] == 503 and "killed by SIGKILL" in error["message"]


def test_closing_the_streams_ends_each_with_an_in_band_503_after_its_whole_events(
        fake_vllm: HTTPServer, proxy: Proxy) -> None:
    """At the end of the shutdown grace period a stream must end in its own format, not be
    cut mid-connection."""
    closed = threading.Event()

    def endless() -> Iterator[bytes]:
        try:
            while True:
                yield b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
                time.sleep(0.01)
        finally:
            closed.set()

    fake_vllm.expect_request("/v1/chat/completions").respond_with_response(
        Response(endless(), content_type="text/event-stream"))
    handler = make_handler(proxy)

    async def close_after_first_yield() -> list[str]:
        items = [item async for item in _until_first(handler, proxy, "The worker is stopping")]
        await proxy.aclose()
        return items

    items = asyncio.run(close_after_first_yield())
    assert items[0].startswith("data: {") and all(i.endswith("\n\n") for i in items)
    ended = items[-1].split("\n\n")
    assert ended[-2] == "data: [DONE]"
    error = json.loads(ended[-3].removeprefix("data: "))["error"]
    assert error["code"] == 503 and error["message"] == "The worker is stopping"
    assert closed.wait(1), "vLLM's connection stayed open"


async def _until_first(handler: Any, proxy: Proxy, reason: str) -> Any:
    """The job's items, with the streams closed (from another thread) after the first."""
    async for item in handler({"id": "s", "input": {"messages": [], "stream": True}}):
        yield item
        if not item.startswith("data: {\"error"):
            await asyncio.to_thread(proxy.close_streams, reason)
