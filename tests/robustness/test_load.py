"""Nothing is lost under load: hundreds of concurrent streams, and very large bodies.

The upstream is the stand-in vLLM (fakes.vllm), a process of its own that writes every
stream's bytes as a pure function of the request (so each can be rebuilt and compared byte
for byte) in pieces that cut events and UTF-8 characters anywhere, and counts what it
served.
The handler is driven by the Runpod SDK's own `run_job_generator`, and the local endpoint
is the real app in front of the same handler. Everything is on loopback; every wait has
a deadline; only counts and bytes are asserted, never timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from runpod.serverless.modules.rp_job import run_job_generator
from runpod.serverless.modules.rp_logger import RunPodLogger

from fakes.bodies import MULTIBYTE, json_body, stream_body
from fakes.platform import Platform
from handler import make_handler
from support import SERVED, LocalEndpoint, StandIn
from support.figures import EVENTS, STREAMS
from support.workers import Worker, serving, sse_data
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.target import Target

ENDPOINT_CONCURRENCY = 64
BIG_BODY = 10 << 20
CHAT = "/v1/chat/completions"


def stream_request(stream: int, events: int = EVENTS, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"stream {stream}"}], "stream": True,
            "load_stream": stream, "load_events": events, **extra}


def events_in(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block]


@pytest.fixture(autouse=True)
def quiet_sdk() -> Iterator[None]:
    """The SDK prints every yield at DEBUG: 100,000s of lines would be the bottleneck."""
    logger = RunPodLogger()
    level = logger.level
    logger.level = "WARN"
    yield
    logger.level = level


@pytest.fixture
def proxy(stand_in: StandIn) -> Proxy:
    """The handler's proxy with the worker's default pacing, pointed at the fast stand-in."""
    return Proxy(Target(SERVED, stand_in.url), request_timeout=120, pacing=Pacing())


async def sdk_job(proxy: Proxy, job_input: Any, job_id: str) -> list[dict[str, Any]]:
    """Every item the SDK would post for the job (`{"output": ...}` or `{"error": ...}`)."""
    return [out async for out in run_job_generator(make_handler(proxy),
                                                   {"id": job_id, "input": job_input})]


def test_256_concurrent_streams_through_the_handler_arrive_whole_and_in_order(
        stand_in: StandIn, proxy: Proxy) -> None:
    """512,000 events at once: each stream's posts must rebuild its upstream bytes exactly."""

    async def scenario() -> list[list[dict[str, Any]]]:
        try:
            return await asyncio.gather(*(
                sdk_job(proxy, {"openai_route": CHAT, "openai_input": stream_request(s)},
                        f"load-{s}")
                for s in range(STREAMS)))
        finally:
            await proxy.aclose()

    results = asyncio.run(asyncio.wait_for(scenario(), 240))

    errors = [out for outs in results for out in outs if "error" in out]
    assert errors == []
    relayed = 0
    for stream, outputs in enumerate(results):
        texts = [out["output"] for out in outputs]
        assert all(isinstance(t, str) and t.endswith("\n\n") for t in texts), "whole events"
        body = "".join(texts).encode()
        assert body == stream_body(stream, EVENTS), f"stream {stream} differs"
        assert events_in(body.decode())[-1] == "data: [DONE]"
        relayed += len(body)
    stats = stand_in.wait_for(lambda s: s["connections"] == 0, 10, "the pool closed")
    assert stats["requests"] == STREAMS and stats["streams_done"] == STREAMS
    assert stats["streams_aborted"] == 0
    assert stats["peak_streams"] == STREAMS, "every stream ran at once"
    assert relayed > STREAMS * EVENTS * 20


def test_256_concurrent_streams_through_the_local_endpoint_respect_max_concurrency(
        stand_in: StandIn, proxy: Proxy) -> None:
    """256 OpenAI clients at once behind MAX_CONCURRENCY=64: all served whole, 64 at a time."""

    async def one(client: httpx.AsyncClient, url: str, stream: int) -> tuple[int, str, bytes]:
        async with client.stream("POST", url, json=stream_request(stream)) as answer:
            body = b"".join([chunk async for chunk in answer.aiter_bytes()])
            return answer.status_code, answer.headers["content-type"], body

    async def scenario(url: str) -> list[tuple[int, str, bytes]]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, url, s) for s in range(STREAMS)))

    with LocalEndpoint(proxy, max_concurrency=ENDPOINT_CONCURRENCY) as endpoint:
        answers = asyncio.run(asyncio.wait_for(
            scenario(f"{endpoint.url}/openai/v1/chat/completions"), 240))
        assert endpoint.jobs is not None
        counts = endpoint.jobs.counts()

    for stream, (status, content_type, body) in enumerate(answers):
        assert status == 200 and content_type.startswith("text/event-stream")
        assert body == stream_body(stream, EVENTS), f"stream {stream} differs"
    assert counts["failed"] == 0 and counts["cancelled"] == 0
    assert counts["completed"] == STREAMS
    stats = stand_in.stats()
    assert stats["requests"] == STREAMS and stats["streams_done"] == STREAMS
    assert stats["peak_streams"] == ENDPOINT_CONCURRENCY, "never more, and the slots are used"


def big_request() -> tuple[dict[str, Any], str]:
    """A chat request of about 10 MB of multi-byte text, and its content's SHA-256."""
    content = (MULTIBYTE * 64) * (BIG_BODY // len((MULTIBYTE * 64).encode()))
    body = {"messages": [{"role": "user", "content": content}], "load_body_bytes": BIG_BODY}
    return body, hashlib.sha256(content.encode()).hexdigest()


def test_a_10_mb_request_and_a_10_mb_answer_pass_intact_through_the_handler(
        stand_in: StandIn, proxy: Proxy) -> None:
    body, digest = big_request()

    async def scenario() -> list[dict[str, Any]]:
        try:
            return await sdk_job(proxy, {"openai_route": CHAT, "openai_input": body}, "big")
        finally:
            await proxy.aclose()

    outputs = asyncio.run(asyncio.wait_for(scenario(), 60))

    assert len(outputs) == 1 and set(outputs[0]) == {"output"}
    assert outputs[0]["output"] == json.loads(json_body(BIG_BODY, digest))
    assert len(outputs[0]["output"]["choices"][0]["message"]["content"].encode()) >= BIG_BODY


def test_a_10_mb_request_and_a_10_mb_answer_pass_intact_through_the_local_endpoint(
        stand_in: StandIn, proxy: Proxy) -> None:
    body, digest = big_request()
    with LocalEndpoint(proxy) as endpoint:
        answer = httpx.post(f"{endpoint.url}/openai/v1/chat/completions", json=body, timeout=60)
        runsync = httpx.post(f"{endpoint.url}/runsync", timeout=60,
                             json={"input": {"openai_route": CHAT, "openai_input": body}})
    expected = json.loads(json_body(BIG_BODY, digest))
    assert answer.status_code == 200 and answer.json() == expected
    assert len(answer.content) >= BIG_BODY
    assert runsync.json()["status"] == "COMPLETED" and runsync.json()["output"] == [expected]


MULTIBYTE_STREAM = {"load_events": 1100, "load_text": "multibyte", "load_event_chars": 400,
                    "load_piece": 4093}


def test_a_stream_of_1_mb_of_multibyte_text_is_relayed_byte_exact(
        stand_in: StandIn, proxy: Proxy) -> None:
    """Pieces of 4,093 bytes cut characters of 2 to 4 bytes: none may be split or replaced."""
    expected = stream_body(7, 1100, "multibyte", 400)
    request = stream_request(7, **MULTIBYTE_STREAM)

    async def through_handler() -> list[dict[str, Any]]:
        try:
            return await sdk_job(proxy, {"openai_route": CHAT, "openai_input": request}, "mb")
        finally:
            await proxy.aclose()

    outputs = asyncio.run(asyncio.wait_for(through_handler(), 60))
    with LocalEndpoint(proxy) as endpoint, httpx.stream(
            "POST", f"{endpoint.url}/openai/v1/chat/completions", json=request,
            timeout=60) as answer:
        via_endpoint = answer.read()

    assert len(expected) > 1 << 20
    texts = [out["output"] for out in outputs]
    assert "".join(texts).encode() == expected
    assert all("\ufffd" not in text for text in texts)
    assert via_endpoint == expected


def test_the_worker_under_the_runpod_sdk_runs_at_most_max_concurrency_jobs_at_once(
        start_workers: Callable[..., Worker], job_platform: Platform, tmp_path: Path) -> None:
    """`python handler.py` with MAX_CONCURRENCY=3 and 12 streams queued: vLLM never serves
    more than 3 at once, uses all 3, and every stream arrives whole."""
    peak = tmp_path / "peak"
    worker = serving(start_workers(MAX_CONCURRENCY="3", FAKE_VLLM_TOKEN_DELAY="0.02",
                                   FAKE_VLLM_PEAK_FILE=str(peak)), job_platform)
    jobs = [job_platform.queue_job({"openai_route": CHAT, "openai_input": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}})
        for _ in range(12)]

    results = [job_platform.result(job_id, timeout=60) for job_id in jobs]

    assert int(peak.read_text()) == 3
    for result in results:
        data = sse_data("".join(result["output"]))
        assert data[-1] == "[DONE]"
        assert [json.loads(d)["choices"][0]["delta"]["content"] for d in data[1:-1]] == [
            f"tok{i} " for i in range(20)]
    assert worker.proc.poll() is None
