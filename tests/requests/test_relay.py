"""The SSE relay: whole events only, byte-exact, first event at once, coalesced after."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from worker.requests import relay
from worker.requests.relay import Pacing, StreamRelay
from worker.requests.sse import StreamKind


def chat_events(n: int, text: str = "héllo 世界 🙂") -> bytes:
    payloads = [{"choices": [{"delta": {"content": f"{text} {i}"}}]} for i in range(n)]
    events = [f"data: {json.dumps(p, ensure_ascii=False)}\n\n" for p in payloads]
    return ("".join(events) + "data: [DONE]\n\n").encode()


class Source:
    """An upstream whose chunks the test releases one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None | Exception] = asyncio.Queue()

    def send(self, chunk: bytes) -> None:
        self.queue.put_nowait(chunk)

    def end(self) -> None:
        self.queue.put_nowait(None)

    def fail(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item


async def chunks_of(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    position, i = 0, 0
    while position < len(data):
        size = sizes[i % len(sizes)]
        yield data[position:position + size]
        position += size
        i += 1
        await asyncio.sleep(0)


async def collect(relay: StreamRelay) -> list[str]:
    return [text async for text in relay]


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [1, 64, 5], [4096]])
def test_any_split_gives_back_the_exact_body_in_whole_events(sizes: list[int]) -> None:
    body = chat_events(40)
    relay = StreamRelay(chunks_of(body, sizes), Pacing(flush_interval=0))
    yields = asyncio.run(collect(relay))
    assert "".join(yields).encode() == body
    for text in yields:
        assert text.endswith("\n\n")
        assert text.startswith("data: ")


def test_multibyte_characters_split_across_chunks_survive() -> None:
    body = "data: {\"t\": \"日本語テキスト🙂🙂\"}\n\n".encode() * 50
    yields = asyncio.run(collect(StreamRelay(chunks_of(body, [1, 2, 5]), Pacing(0))))
    assert "".join(yields).encode() == body
    assert all("\ufffd" not in text for text in yields)


def test_responses_api_event_lines_are_kept() -> None:
    body = (b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n"
            b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n")
    yields = asyncio.run(collect(StreamRelay(chunks_of(body, [3]), Pacing(0))))
    assert "".join(yields).encode() == body


def test_first_event_is_yielded_before_the_upstream_sends_more() -> None:
    async def scenario() -> None:
        source = Source()
        relay = StreamRelay(aiter(source), Pacing(flush_interval=0.1)).__aiter__()
        source.send(b"data: first\n\ndata: par")
        first = await asyncio.wait_for(anext(relay), 5)
        assert first == "data: first\n\n"
        source.send(b"t\n\n")
        source.end()
        rest = [text async for text in relay]
        assert rest == ["data: part\n\n"]

    asyncio.run(scenario())


ROLE = ('data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}]}\n\n')
TOKEN = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'


def test_a_role_chunk_waits_for_the_first_token_however_late_it_comes() -> None:
    """vLLM writes them apart; the role chunk alone shows nothing and would keep the
    platform's post busy when the token comes."""

    async def scenario() -> None:
        source = Source()
        stream = StreamRelay(aiter(source), Pacing(flush_interval=60)).__aiter__()
        source.send(ROLE.encode())
        first = asyncio.ensure_future(anext(stream))
        for _ in range(20):  # the relay has seen the role chunk and holds it
            await asyncio.sleep(0)
        assert not first.done()
        source.send(TOKEN.encode())
        assert await asyncio.wait_for(first, 5) == ROLE + TOKEN, "at once, not after 60 s"
        source.end()
        assert [text async for text in stream] == []

    asyncio.run(scenario())


@pytest.mark.parametrize(("kind", "preamble", "output"), [
    (StreamKind.RESPONSES,
     "event: response.created\ndata: {}\n\nevent: response.in_progress\ndata: {}\n\n"
     "event: response.output_item.added\ndata: {}\n\n"
     "event: response.content_part.added\ndata: {}\n\n",
     'event: response.output_text.delta\ndata: {"delta": "Hi"}\n\n'),
    (StreamKind.MESSAGES,
     "event: message_start\ndata: {}\n\nevent: content_block_start\ndata: {}\n\n"
     "event: ping\ndata: {}\n\n",
     'event: content_block_delta\ndata: {"delta": {"text": "Hi"}}\n\n'),
    (StreamKind.OPENAI, ROLE,
     'data: {"choices":[{"index":0,"delta":{"reasoning":"Hm"},"finish_reason":null}]}\n\n'),
    (StreamKind.OPENAI, ROLE,
     'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"id":"t"}]}}]}\n\n'),
    (StreamKind.OPENAI, "", 'data: {"choices":[{"index":0,"text":"Once"}]}\n\n'),
])
def test_the_first_output_of_every_stream_kind_goes_out_with_all_before_it(
        kind: StreamKind, preamble: str, output: str) -> None:
    async def scenario() -> list[str]:
        source = Source()
        stream = StreamRelay(aiter(source), Pacing(flush_interval=60), kind).__aiter__()
        for event in preamble.split("\n\n")[:-1]:
            source.send(f"{event}\n\n".encode())
        first = asyncio.ensure_future(anext(stream))
        for _ in range(20):
            await asyncio.sleep(0)
        held = not first.done()
        source.send(output.encode())
        got = [await asyncio.wait_for(first, 5)]
        source.end()
        return [str(held), *got, *[text async for text in stream]]

    assert asyncio.run(scenario()) == ["True", preamble + output]


def test_a_stream_with_no_output_still_ends_whole() -> None:
    async def scenario() -> list[str]:
        source = Source()
        source.send(ROLE.encode())
        source.end()
        return await collect(StreamRelay(aiter(source), Pacing(flush_interval=60)))

    assert asyncio.run(scenario()) == [ROLE]


def test_a_large_first_read_is_not_parsed_whole_before_the_first_yield() -> None:
    async def scenario() -> list[str]:
        source = Source()
        for i in range(200):  # all already read: the pump never waits between them
            source.send(f"data: {i}\n\n".encode())
        source.end()
        return await collect(StreamRelay(aiter(source), Pacing(flush_interval=0)))

    yields = asyncio.run(scenario())
    assert "".join(yields) == "".join(f"data: {i}\n\n" for i in range(200))
    assert yields[0].count("\n\n") <= relay.FIRST_BATCH + 1


def test_events_arriving_while_the_consumer_is_busy_go_out_in_one_yield() -> None:
    async def scenario() -> None:
        source = Source()
        relay = StreamRelay(aiter(source), Pacing(flush_interval=0)).__aiter__()
        source.send(b"data: 0\n\n")
        assert await anext(relay) == "data: 0\n\n"
        # The consumer is "posting" the first yield: ten events arrive meanwhile.
        for i in range(1, 11):
            source.send(f"data: {i}\n\n".encode())
        source.end()
        rest = [text async for text in relay]
        assert rest == ["".join(f"data: {i}\n\n" for i in range(1, 11))]

    asyncio.run(scenario())


def test_a_stream_costs_at_most_one_yield_per_flush_interval_plus_two() -> None:
    body = chat_events(1000)
    started = time.monotonic()
    yields = asyncio.run(collect(StreamRelay(chunks_of(body, [60]), Pacing(0.05))))
    duration = time.monotonic() - started
    assert "".join(yields).encode() == body
    assert len(yields) <= duration / 0.05 + 2


def test_batch_knobs_send_a_yield_once_the_batch_is_full() -> None:
    async def scenario() -> list[str]:
        source = Source()
        pacing = Pacing(flush_interval=60, min_batch_size=1, max_batch_size=4,
                        growth_factor=2)
        relay = StreamRelay(aiter(source), pacing).__aiter__()
        got = []
        source.send(b"data: a\n\n")
        got.append(await anext(relay))
        # Target is now 2: two events release the next yield long before the interval is over.
        source.send(b"data: b\n\ndata: c\n\n")
        got.append(await asyncio.wait_for(anext(relay), 30))
        source.end()
        got += [text async for text in relay]
        return got

    assert asyncio.run(scenario()) == ["data: a\n\n", "data: b\n\ndata: c\n\n"]


def test_pacing_targets_grow_to_the_maximum() -> None:
    pacing = Pacing(0.05, min_batch_size=1, max_batch_size=50, growth_factor=3)
    targets = [pacing.first_target()]
    for _ in range(6):
        targets.append(pacing.next_target(targets[-1]))
    assert targets == [1, 3, 9, 27, 50, 50, 50]
    assert Pacing(0.05).first_target() is None


def test_an_upstream_failure_is_raised_after_the_complete_events() -> None:
    async def scenario() -> tuple[list[str], BaseException | None]:
        source = Source()
        got: list[str] = []
        source.send(b"data: 1\n\ndata: 2\n\ndata: trunc")
        source.fail(ConnectionResetError("reset by peer"))
        try:
            async for text in StreamRelay(aiter(source), Pacing(0)):
                got.append(text)
        except ConnectionResetError as exc:
            return got, exc
        return got, None

    yields, error = asyncio.run(scenario())
    assert "".join(yields) == "data: 1\n\ndata: 2\n\n"
    assert isinstance(error, ConnectionResetError)


def test_a_fragment_of_an_event_at_the_end_is_never_yielded() -> None:
    body = b"data: 1\n\ndata: {\"half"
    yields = asyncio.run(collect(StreamRelay(chunks_of(body, [4]), Pacing(0))))
    assert "".join(yields) == "data: 1\n\n"


def test_closing_the_relay_stops_reading_the_upstream() -> None:
    async def scenario() -> bool:
        closed = asyncio.Event()

        async def endless() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: x\n\n"
                    await asyncio.sleep(0.001)
            finally:
                closed.set()

        relay = StreamRelay(endless(), Pacing(0)).__aiter__()
        await anext(relay)
        await relay.aclose()
        await asyncio.wait_for(closed.wait(), 1)
        return closed.is_set()

    assert asyncio.run(scenario())
