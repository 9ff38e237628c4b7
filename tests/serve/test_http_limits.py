"""The worker's HTTP servers against hostile clients: a huge head, a slow head, idle
keep-alive connections and a flood of connections; in-process uvicorn on loopback with
the worker's own protocol (smaller limits, so the test is quick)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes.vllm import free_port
from worker.serve import http_limits


class Small(http_limits.GuardedHttp):
    max_head_bytes = 4096
    head_timeout = 0.5
    max_connections = 8


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    config = http_limits.config(hello, host="127.0.0.1", port=port)
    config.http = Small
    config.timeout_keep_alive = 1
    served = http_limits.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not served.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"127.0.0.1:{port}"
    served.should_exit = True
    thread.join(10)


def connect(where: str) -> socket.socket:
    host, port = where.split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_a_request_head_over_the_limit_is_refused_431_before_the_rest_is_read(
        server: str) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
        reply = answer(sock)  # the server closes without waiting for the head's end
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert b'"code": 431' in reply


def test_a_head_that_does_not_arrive_in_time_is_refused_408(server: str) -> None:
    with connect(server) as silent, connect(server) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost")
        assert answer(silent).startswith(b"HTTP/1.1 408 ")
        assert answer(slow).startswith(b"HTTP/1.1 408 ")


def test_an_idle_keep_alive_connection_is_closed_and_ordinary_requests_pass(
        server: str) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = answer(sock)  # served, then closed once idle for the keep-alive timeout
    assert reply.startswith(b"HTTP/1.1 200 ") and b"\r\nhello\r\n" in reply


def test_beyond_the_connection_cap_a_new_one_is_refused_and_the_others_served(
        server: str) -> None:
    held = [connect(server) for _ in range(Small.max_connections)]
    try:
        with connect(server) as extra:
            assert answer(extra).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the held ones are gone once the server has seen them close
        try:
            assert httpx.get(f"http://{server}/", timeout=5).text == "hello"
            break
        except (httpx.TransportError, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
