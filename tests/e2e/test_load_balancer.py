"""The load-balancing server on the real vLLM (CPU build), as Runpod and clients use it:
`make run-lb` (conftest's real_lb). The OpenAI, Anthropic and OpenWebUI calls run against it
in e2e/test_clients.py; here is what only this server does. The last test ends it with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from support import run_readme_example
from support.readme_checks import LB_EXAMPLES
from support.real_vllm import RealEndpoint, vllm_processes
from support.workers import wait_until
from worker.upstream.child import group_members

HELLO = [{"role": "user", "content": "Hello there"}]


def test_ping_said_204_while_vllm_loaded_then_200(real_lb: RealEndpoint) -> None:
    said = [status for status in real_lb.pings if status is not None]
    assert said[0] == 204 and said[-1] == 200 and set(said) == {204, 200}
    assert said.index(200) == len(said) - 1, "never 200 before ready"
    assert len(said) > 10, "vLLM took its time to load, and /ping answered meanwhile"


def test_a_volume_that_cannot_hold_the_compile_cache_leaves_vllms_default(
        real_lb: RealEndpoint) -> None:
    """The fixture's volume has a file where the cache folder would be; vLLM came up."""
    blocked = real_lb.log.parent / "vllm-cache"
    assert blocked.read_text() == "not a folder"
    default = os.path.expanduser("~/.cache/vllm")
    assert (f"compile cache in vLLM's default {default}: {blocked}/tiny-chat-"
            in real_lb.log_text())
    assert "cannot be written" in real_lb.log_text()
    assert "Start-up of tiny-chat: located in " in real_lb.log_text()


@pytest.mark.parametrize("path", ["/collective_rpc", "/sleep", "/v1/load_lora_adapter",
                                  "/reset_prefix_cache", "/metrics", "/pause", "/docs"])
def test_vllms_admin_routes_are_404s_that_never_reach_it(real_lb: RealEndpoint,
                                                         path: str) -> None:
    answer = httpx.post(f"{real_lb.url}{path}", headers=real_lb.headers, json={})
    assert answer.status_code == 404
    assert "is not a route this worker serves" in answer.json()["error"]["message"]


def test_the_api_key_is_required_when_set(real_lb: RealEndpoint) -> None:
    assert httpx.get(f"{real_lb.url}/v1/models").status_code == 401
    assert httpx.get(f"{real_lb.url}/ping").status_code == 200


@pytest.mark.parametrize("name", sorted(LB_EXAMPLES))
def test_readme_load_balancing_examples_run(real_lb: RealEndpoint, name: str) -> None:
    LB_EXAMPLES[name](run_readme_example(name, real_lb.url, real_lb.api_key))


def test_sigterm_ends_open_streams_in_band_after_the_grace_period_leaving_nothing(
        real_lb: RealEndpoint) -> None:
    """Last in this module (it ends the server): three long streams, then SIGTERM."""
    body = {"model": real_lb.model, "messages": HELLO, "max_tokens": 30000,
            "ignore_eos": True, "stream": True}
    streams: list[bytes] = []
    started = threading.Barrier(4)

    def read() -> None:
        with httpx.stream("POST", f"{real_lb.url}/v1/chat/completions", json=body,
                          headers=real_lb.headers, timeout=120) as answer:
            chunks = answer.iter_raw()
            first = next(chunks)
            started.wait(60)
            streams.append(first + b"".join(chunks))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    started.wait(60)
    os.killpg(real_lb.process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + 10
    while httpx.get(f"{real_lb.url}/ping", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "/ping kept saying 200 after SIGTERM"
    for reader in readers:
        reader.join(60)
    vllm_port = int(real_lb.vllm_url.rsplit(":", 1)[1])
    wait_until(lambda: not group_members(real_lb.process.pid), 60, "the worker to exit")
    assert len(streams) == 3
    for text in streams:
        events = [line[6:] for line in text.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "grace period" in error["message"]
        assert len(events) > 10, "they streamed during the grace period"
    assert vllm_processes(vllm_port) == []
