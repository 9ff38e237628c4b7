"""The pool to vLLM (httpx on aiohttp's transport) keeps what it promises: its timeouts, no
connection cap below the worker's concurrency, reuse, its headers, one pool per event loop,
and failures that say what happened."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from pytest_httpserver import HTTPServer

from support import SERVED, StandIn
from worker.requests import pool
from worker.requests.proxy import Proxy
from worker.upstream.target import Target


def test_request_timeout_is_the_read_timeout_and_connecting_gets_10_s() -> None:
    async def timeouts() -> httpx.Timeout:
        client = pool.make_client(42, None, 8)
        async with client:
            return client.timeout

    timeout = asyncio.run(timeouts())
    assert timeout.read == 42 and timeout.connect == 10


def test_the_pool_holds_more_connections_than_the_transports_default_cap_of_100(
        stand_in: StandIn) -> None:
    """Sized from MAX_CONCURRENCY: 150 answers in progress at once, on 150 connections."""
    proxy = Proxy(Target(SERVED, stand_in.url), max_connections=150)

    async def many() -> None:
        async def one() -> None:
            await proxy.client.post(f"{stand_in.url}/v1/chat/completions", json={
                "model": SERVED, "messages": [], "bench_answer_delay": 30})

        calls = [asyncio.ensure_future(one()) for _ in range(150)]
        try:
            await asyncio.to_thread(stand_in.wait_for, lambda s: s["serving"] == 150, 30,
                                    "150 answers in progress at once")
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await proxy.aclose()

    asyncio.run(many())
    stand_in.wait_for(lambda s: s["serving"] == 0, 10, "every cancelled answer aborted")


def test_sequential_requests_reuse_one_connection(stand_in: StandIn) -> None:
    proxy = Proxy(Target(SERVED, stand_in.url))

    async def twenty() -> int:
        try:
            for _ in range(20):
                answer = await proxy.client.get(f"{stand_in.url}/v1/models")
                assert answer.status_code == 200
            return stand_in.stats()["connections"]
        finally:
            await proxy.aclose()

    assert asyncio.run(twenty()) == 1


def test_every_request_asks_for_the_bytes_as_sent_and_carries_vllms_api_key(
        fake_vllm: HTTPServer) -> None:
    fake_vllm.expect_request("/v1/models", headers={
        "Accept-Encoding": "identity", "Authorization": "Bearer vllm-key"}).respond_with_json(
        {"object": "list", "data": []})
    proxy = Proxy(Target(SERVED, fake_vllm.url_for("/").rstrip("/")), api_key="vllm-key")

    async def ask() -> int:
        try:
            return (await proxy.client.get(fake_vllm.url_for("/v1/models"))).status_code
        finally:
            await proxy.aclose()

    assert asyncio.run(ask()) == 200


def test_each_event_loop_gets_a_pool_of_its_own() -> None:
    proxy = Proxy(Target(SERVED, "http://127.0.0.1:9"))

    async def client() -> httpx.AsyncClient:
        return proxy.client

    first = asyncio.run(client())
    second = asyncio.run(client())
    assert first is not second and proxy._client is second


@contextlib.contextmanager
def listener(answer: bytes | None) -> Iterator[str]:
    """A server that reads a request, then sends `answer` (None: nothing) and closes."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                if answer:
                    conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def failure(url: str) -> Exception:
    async def ask() -> Exception:
        async with pool.make_client(5, None, 4) as client:
            try:
                await client.post(url, content=b"{}")  # a GET is retried once
            except httpx.HTTPError as exc:
                return exc
        raise AssertionError("no failure")

    return asyncio.run(ask())


def test_a_refused_connect_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert type(failure(f"http://127.0.0.1:{port}/")) is httpx.ConnectError


@pytest.mark.parametrize(("answer", "kind", "says"), [
    (None, httpx.RemoteProtocolError, "Server disconnected"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", httpx.RemoteProtocolError, "not valid HTTP"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", httpx.ReadError, "not completed"),
])
def test_a_broken_answer_is_a_protocol_or_read_error_that_names_it(
        answer: bytes | None, kind: type[Exception], says: str) -> None:
    with listener(answer) as url:
        error = failure(url)
    assert type(error) is kind and says in str(error)
    assert "\n" not in str(error)
