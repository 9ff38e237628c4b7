"""vLLM's stream read as whole events, and the verdict on how it ended, from any split."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from worker.requests.errors import ProxyError
from worker.requests.event_reader import EventReader


class Chunks(httpx.AsyncByteStream):
    """A response body given chunk by chunk, optionally failing at its end."""

    def __init__(self, chunks: list[bytes], failure: Exception | None = None,
                 gate: asyncio.Event | None = None) -> None:
        self.chunks, self.failure, self.gate = chunks, failure, gate
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure

    async def aclose(self) -> None:
        self.closed = True
        if self.gate is not None:
            self.gate.set()


class Verdicts:
    """What the proxy tells a reader, recorded."""

    def __init__(self) -> None:
        self.closing: str | None = None
        self.open: set[EventReader] = set()

    async def transport_error(self, exc: BaseException) -> ProxyError:
        return ProxyError(502, f"broke: {exc}")

    @contextlib.contextmanager
    def tracking(self, stream: EventReader) -> Iterator[None]:
        self.open.add(stream)
        try:
            yield
        finally:
            self.open.discard(stream)


def read(body: Chunks, verdicts: Verdicts | None = None) -> tuple[list[bytes], EventReader]:
    verdicts = verdicts or Verdicts()

    async def scenario() -> tuple[list[bytes], EventReader]:
        events = EventReader(httpx.Response(200, stream=body), verdicts)
        async with events:
            got = [chunk async for chunk in events]
        assert verdicts.open == set(), "a reader is tracked only while open"
        return got, events

    return asyncio.run(scenario())


STREAM = "".join(f"data: {{\"i\": {i}, \"t\": \"héllo 🙂\"}}\n\n" for i in range(30)).encode()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_any_split_gives_whole_events_that_join_into_the_body(size: int) -> None:
    got, events = read(Chunks([STREAM[i:i + size] for i in range(0, len(STREAM), size)]))
    assert b"".join(got) == STREAM and events.failure is None
    assert all(chunk.endswith(b"\n\n") for chunk in got)
    for chunk in got:
        chunk.decode()  # never a split character


def test_every_line_ending_sse_allows_ends_an_event() -> None:
    body = b"data: 1\r\n\r\ndata: 2\r\rdata: 3\n\n"
    got, events = read(Chunks([body[:11], body[11:17], body[17:]]))
    assert b"".join(got) == body and events.failure is None


def test_a_stream_that_stops_inside_an_event_is_a_502_after_the_whole_events() -> None:
    got, events = read(Chunks([b"data: 1\n\ndata: {\"ha", b"lf"]))
    assert got == [b"data: 1\n\n"]
    assert events.failure is not None and events.failure.status == 502
    assert "middle of an event (12 bytes cut off)" in events.failure.message


def test_a_transport_error_gives_the_proxys_verdict_after_the_whole_events() -> None:
    got, events = read(Chunks([b"data: 1\n\ndata: 2"], httpx.ReadError("reset")))
    assert got == [b"data: 1\n\n"]
    assert events.failure is not None and events.failure.message == "broke: reset"


def test_an_interrupt_ends_the_stream_with_a_503_giving_the_reason() -> None:
    verdicts = Verdicts()
    verdicts.closing = "The worker is stopping."
    gate = asyncio.Event()  # the body waits until it is closed, as vLLM's open stream does

    async def scenario() -> tuple[list[bytes], EventReader, Chunks]:
        body = Chunks([b"data: 1\n\n"], httpx.ReadError("closed"), gate)
        events = EventReader(httpx.Response(200, stream=body), verdicts)
        got = []
        async with events:
            async for chunk in events:
                got.append(chunk)
                events.interrupt()
        return got, events, body

    got, events, body = asyncio.run(scenario())
    assert got == [b"data: 1\n\n"] and body.closed
    assert events.failure is not None and events.failure.status == 503
    assert events.failure.message == "The worker is stopping."
