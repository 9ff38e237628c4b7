"""The worker's HTTP servers against hostile clients: a huge head, a slow head, a body that
stalls or trickles, an answer nobody reads, idle keep-alive connections and a flood of
connections; in-process uvicorn on loopback with the worker's own protocol (smaller limits
and timeouts, so the test is quick). test_http_front.py sends the same kinds of bytes to
the two real servers."""

from __future__ import annotations

import asyncio
import contextlib
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
    body_timeout = 0.5
    body_deadline = 2.0
    write_timeout = 0.5
    max_connections = 8


SEEN: list[str] = []  # what the application read: "body <n>", "disconnect", "gone"


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """`/echo` reads the body and answers its length; `/endless` streams until the client
    is gone; anything else answers hello."""
    if scope["path"] == "/echo":
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                SEEN.append("disconnect")
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        SEEN.append(f"body {size}")
        reply = str(size).encode()
    elif scope["path"] == "/endless":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        gone = asyncio.ensure_future(receive())
        while not gone.done():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        SEEN.append("gone")
        return
    else:
        reply = b"hello"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture
def server() -> Iterator[str]:
    SEEN.clear()
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


AIOHTTP_POOL_IDLE = 15.0  # aiohttp's TCPConnector keeps an idle connection 15 s by default


def test_an_idle_connection_outlives_the_clients_pools_so_the_client_drops_it_first() -> None:
    longest = max(httpx.Limits().keepalive_expiry or 0, AIOHTTP_POOL_IDLE)
    assert longest < http_limits.KEEP_ALIVE
    assert http_limits.config(hello).timeout_keep_alive == http_limits.KEEP_ALIVE


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


def test_body_bytes_read_with_the_head_do_not_count_towards_the_head_limit(server: str) -> None:
    body = b"b" * 100_000  # 25 times the head limit, in the same write as the head
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + body)
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n100000\r\n0\r\n\r\n")


def test_a_body_that_stalls_is_answered_408_and_the_application_reads_a_disconnect(
        server: str) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"a\": 1}")
        started = time.monotonic()
        reply = answer(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"sent nothing for 0.5 s" in reply
    assert 0.4 < time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while not SEEN and time.monotonic() < deadline:
        time.sleep(0.01)
    assert SEEN == ["disconnect"], "the application never takes a cut body for a whole one"


def test_a_body_that_trickles_past_its_deadline_is_answered_408(server: str) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        sock.setblocking(False)
        reply = b""
        while time.monotonic() - started < 10:
            with contextlib.suppress(BlockingIOError):  # one byte, well inside the idle time
                sock.send(b"a")
            time.sleep(0.1)  # the trickle itself, not a wait for the server
            with contextlib.suppress(BlockingIOError):
                if not (chunk := sock.recv(65536)):
                    break
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 2 s" in reply
    assert time.monotonic() - started < 6


def test_an_answer_the_client_does_not_read_ends_its_connection(server: str) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.split(":")
    sock.connect((host, int(port)))
    with sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        deadline = time.monotonic() + 10
        while SEEN != ["gone"]:
            assert time.monotonic() < deadline, "the stalled answer was never ended"
            time.sleep(0.05)
