"""Both servers clients reach (the load-balancing server, `python handler.py` with PORT; the
local endpoint, `python local_endpoint.py`), sent the raw bytes real clients and attackers
send, over a socket: long bodies in one write, upgrades, bodies that trickle or are cut
off, clients that leave before vLLM answers, HTTP/1.0, odd Authorization headers. Each
runs in front of the stand-in vLLM (fakes.vllm), whose counters say what reached it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fakes.vllm import free_port
from support import SERVED, StandIn, figures
from support.workers import PROJECT, wait_until

KEY = "front-test-key-5678"


@dataclass
class Front:
    """One of the two servers, started as users start it, in front of the stand-in."""

    kind: str
    port: int
    chat: str  # the chat route's path on this server
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=20)

    def request(self, head: str, body: bytes = b"", key: str | None = KEY) -> bytes:
        """`head` (request line and headers, without the blank line), the key, then the
        body, in one write; everything the server sends until it closes."""
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        with self.connect() as sock:
            sock.sendall(f"{head}\r\nHost: x\r\n{auth}\r\n".encode() + body)
            return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def chat_body(size: int = 0, **fields: object) -> bytes:
    """A chat request of at least `size` bytes (a long user message)."""
    message = "a" * max(0, size - 120)
    return json.dumps({"model": SERVED, "max_tokens": 3, "messages": [
        {"role": "user", "content": message}], **fields}).encode()


def post(front: Front, body: bytes, extra: str = "", version: str = "1.1") -> str:
    return (f"POST {front.chat} HTTP/{version}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close{extra}")


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.fixture(scope="module", params=["lb", "local"])
def front(request: pytest.FixtureRequest, stand_in_server: StandIn,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"front-{kind}")
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1", "MODEL_NAME": SERVED, "VLLM_BASE_URL": stand_in_server.url,
           "VLLM_STARTUP_TIMEOUT": "20", "MAX_CONCURRENCY": "1", "SHUTDOWN_GRACE_PERIOD": "1"}
    if kind == "lb":
        argv = [sys.executable, "handler.py"]
        env |= {"PORT": str(port), "API_KEY": KEY}
        chat = "/v1/chat/completions"
    else:
        argv = [sys.executable, "local_endpoint.py", "--port", str(port)]
        env |= {"LOCAL_API_KEY": KEY}
        chat = "/v2/front/openai/v1/chat/completions"
    log = tmp / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=PROJECT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, process_group=0)
    served = Front(kind, port, chat, process, log)
    ready = "/ping" if kind == "lb" else "/v2/front/health"

    def answers() -> bool:
        assert process.poll() is None, served.log_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=5,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, 30, f"the {kind} server")
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def stand_in_now(stand_in: StandIn, front: Front) -> StandIn:
    """The stand-in, counters zeroed, once the server has nothing left in flight."""
    stand_in.wait_for(lambda s: s["serving"] == 0, 10, "no chat in progress")
    stand_in.reset()
    return stand_in


@pytest.mark.parametrize("size", figures.ONE_WRITE_BODIES)
def test_a_long_request_sent_in_one_write_is_served_not_taken_for_a_long_head(
        front: Front, stand_in_now: StandIn, size: int) -> None:
    body = chat_body(size)
    reply = front.request(post(front, body), body)
    assert status(reply) == 200, reply[:300]
    assert b'"chat.completion"' in reply
    assert stand_in_now.stats()["requests"] == 1


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_an_upgrade_request_with_a_body_is_refused_at_once_and_reaches_nothing(
        front: Front, stand_in_now: StandIn, upgrade: str) -> None:
    body = chat_body()
    started = time.monotonic()
    reply = front.request(post(front, body, f"\r\nConnection: Upgrade\r\nUpgrade: {upgrade}"
                                            "\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==")
                          .replace("Connection: close\r\n", ""), body)
    assert status(reply) == 400 and time.monotonic() - started < 5
    assert b"Upgrade" in reply or b"WebSocket" in reply
    assert stand_in_now.stats()["requests"] == 0, "no empty request was relayed"


def test_a_websocket_get_is_a_clean_400_and_no_error_is_logged(front: Front) -> None:
    reply = front.request("GET /v1/models HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket"
                          "\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==")
    assert status(reply) == 400
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 400
    assert "ERROR" not in front.log_text() and "Traceback" not in front.log_text()


def test_an_upgrade_without_a_body_is_answered_in_http_1_1_and_the_connection_closed(
        front: Front) -> None:
    models = "/v1/models" if front.kind == "lb" else "/v2/front/openai/v1/models"
    reply = front.request(f"GET {models} HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                          "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
    assert status(reply) == 200 and SERVED.encode() in reply


def test_a_body_that_trickles_in_holds_no_slot_of_max_concurrency(
        front: Front, stand_in_now: StandIn) -> None:
    """MAX_CONCURRENCY is 1: a client that declares a body and sends part of it must not
    lock the next one out (429) while it dawdles."""
    body = chat_body()
    with front.connect() as slow:
        slow.sendall(f"{post(front, b'x' * 1000)}\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                     "\r\n\r\n".encode() + body[:9])
        reply = front.request(post(front, body), body)
        assert status(reply) == 200, reply[:300]
    assert stand_in_now.stats()["requests"] == 1


@pytest.mark.parametrize("cut", ["content-length", "chunked"])
def test_a_body_cut_off_by_a_client_that_leaves_is_never_relayed(
        front: Front, stand_in_now: StandIn, cut: str) -> None:
    """A valid JSON prefix of a longer body, then the client goes: no generation for nobody."""
    body = chat_body()
    if cut == "chunked":
        head = post(front, body).replace(f"Content-Length: {len(body)}",
                                         "Transfer-Encoding: chunked")
        sent = b"%x\r\n%s\r\n" % (len(body), body)  # and never the last chunk
    else:
        head, sent = post(front, body + b" " * 500), body
    with front.connect() as sock:
        sock.sendall(f"{head}\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode() + sent)
    probe = front.request(post(front, chat_body()), chat_body())  # served after it: in order
    assert status(probe) == 200
    assert stand_in_now.stats()["requests"] == 1, "only the whole request reached vLLM"


def test_a_client_that_leaves_before_a_non_streamed_answer_aborts_it_in_vllm(
        front: Front, stand_in_now: StandIn) -> None:
    body = chat_body(bench_answer_delay=60)
    with front.connect() as sock:
        sock.sendall(f"{post(front, body)}\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
                     .encode() + body)
        stand_in_now.wait_for(lambda s: s["serving"] == 1, 10, "the answer in progress")
    stats = stand_in_now.wait_for(lambda s: s["serving"] == 0, 10, "the answer aborted")
    assert stats["answers_aborted"] == 1
    reply = front.request(post(front, chat_body()), chat_body())
    assert status(reply) == 200, "its slot was given back"


def test_an_http_1_0_client_gets_a_stream_without_chunked_encoding(front: Front) -> None:
    body = chat_body(stream=True)
    reply = front.request(post(front, body, version="1.0"), body)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert status(reply) == 200 and b"text/event-stream" in head
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")


def test_an_http_1_0_client_gets_a_json_answer_with_its_length(front: Front) -> None:
    body = chat_body()
    reply = front.request(post(front, body, version="1.0"), body)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert status(reply) == 200 and b"transfer-encoding" not in head.lower()
    assert f"content-length: {len(payload)}".encode() in head.lower()
    assert json.loads(payload)["object"] == "chat.completion"


def test_the_bearer_scheme_is_matched_without_regard_to_case(front: Front) -> None:
    body = chat_body()
    for scheme in ("bearer", "BEARER", "Bearer"):
        head = post(front, body) + f"\r\nAuthorization: {scheme} {KEY}"
        assert status(front.request(head, body, key=None)) == 200, scheme
    assert status(front.request(post(front, body) + "\r\nAuthorization: Basic eDp5", body,
                                key=None)) == 401


def test_a_request_with_two_authorization_headers_is_refused(
        front: Front, stand_in_now: StandIn) -> None:
    body = chat_body()
    for first, second in ((KEY, "wrong"), ("wrong", KEY)):
        head = post(front, body) + f"\r\nAuthorization: Bearer {first}\r\nAuthorization: " \
                                   f"Bearer {second}"
        reply = front.request(head, body, key=None)
        assert status(reply) == 400 and b"Authorization headers" in reply
    assert stand_in_now.stats()["requests"] == 0
