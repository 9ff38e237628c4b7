"""Pace a job's SSE stream into few, whole-event strings, without adding latency.

The job handler's stream (queue path: each yield is one of the platform's stream POSTs)
is read as whole events by event_reader.py, which also owns the verdict on how it ended;
this module decides when to yield. Invariants (tests hold us to each):
- every yielded string is a run of whole SSE events, cut only after a blank
  line, so no event and no UTF-8 character is ever split;
- the concatenation of all yields is the upstream body, byte for byte;
- the first event that carries output (chat delta content, reasoning or tool calls,
  completion text, a Responses API output delta, an Anthropic content block delta:
  anything sse.is_preamble does not know as preamble) is yielded the moment it
  arrives, with every event before it. Those before it (a chat stream's role chunk,
  `response.created`, `message_start`) are held until then, or until the stream
  ends: nobody sees them, and a yield of them alone would keep the consumer (the
  platform's stream POST) busy when the first token comes, a fraction of a
  millisecond later. When one read brings many events, the first yield goes after at
  most `FIRST_BATCH` chunks of it, not after the whole read;
- after that, whatever arrives while the consumer (the platform's stream POST)
  is busy is coalesced into the next yield, and yields are at most one per
  `flush_interval`, counted from one yield to the next (the consumer's time is
  part of the interval, not added to it): an event waits at most the longer of
  the consumer's own time and that interval, and a stream of duration D costs
  at most D / interval + 2 yields;
- the worker-vllm batch knobs (`min_batch_size`, growing by
  `batch_size_growth_factor` up to `max_batch_size`) keep their meaning for
  those who set them: once that many events are waiting they go out without
  waiting for the interval.

A reader task keeps pulling bytes from vLLM while the consumer is busy, so a
slow consumer never slows the generation, and TCP chunk boundaries never matter.
A consumer that takes no time (the local endpoint's OpenAI path writes each item to its
client at once) asks for `Pacing(direct=True)`: the proxy then gives it the events as
they arrive, with no reader task, no holding and no coalescing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from worker.requests.sse import StreamKind, count_events, event_end, first_output_end

FIRST_BATCH = 16  # chunks


@dataclass(frozen=True)
class Pacing:
    """How often to yield: an interval, and optionally worker-vllm's growing batch sizes."""

    flush_interval: float = 0.05
    min_batch_size: int | None = None
    max_batch_size: int | None = None
    growth_factor: float = 3.0
    direct: bool = False  # the consumer takes no time: no pacing at all (module docstring)

    def first_target(self) -> int | None:
        if self.min_batch_size is None and self.max_batch_size is None:
            return None
        return min(self.min_batch_size or 1, self.max_batch_size or 1 << 30)

    def next_target(self, target: int | None) -> int | None:
        if target is None or self.growth_factor <= 1:
            return target
        grown = max(target + 1, int(target * self.growth_factor))
        return min(grown, self.max_batch_size or 1 << 30)


class StreamRelay:
    """Coalesces the chunks of one upstream stream (an EventReader's, which never fails:
    an iterator that raises ends the iteration with its error); iterate with `async for`."""

    def __init__(self, chunks: AsyncIterator[bytes], pacing: Pacing,
                 kind: StreamKind = StreamKind.OPENAI) -> None:
        self._chunks = chunks
        self._kind = kind
        self._scanned = 0  # the events before this index are preamble
        self._pacing = pacing
        self._buffer = bytearray()
        self._arrived = asyncio.Event()
        self._finished = asyncio.Event()
        self._error: BaseException | None = None
        self._yielded = False

    async def _pump(self) -> None:
        chunks = 0
        try:
            async for chunk in self._chunks:
                self._buffer += chunk
                self._arrived.set()
                chunks += 1
                if chunks >= FIRST_BATCH and not self._yielded:
                    # Chunks already read come without a pause in between: let the first
                    # yield go now rather than after the whole read (module docstring).
                    await asyncio.sleep(0)
        except Exception as exc:  # raised to the consumer once the events before it are out
            self._error = exc
        finally:
            self._finished.set()
            self._arrived.set()

    async def _pace(self, deadline: float, target: int | None) -> None:
        """Wait until the flush interval is over, the stream ends, or a batch fills."""
        loop = asyncio.get_running_loop()
        while not self._finished.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            ready = target is not None and count_events(self._buffer) >= target
            if ready:
                return
            waiter = self._arrived if target is not None else self._finished
            waiter.clear()
            try:
                await asyncio.wait_for(waiter.wait(), remaining)
            except TimeoutError:
                return

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._pump())
        target = self._pacing.first_target()
        last_yield: float | None = None
        try:
            while True:
                await self._arrived.wait()
                self._arrived.clear()
                end = event_end(self._buffer)
                if end == 0 and not self._finished.is_set():
                    continue
                if last_yield is not None:
                    await self._pace(last_yield + self._pacing.flush_interval, target)
                elif not self._finished.is_set() and not first_output_end(
                        self._buffer, self._scanned, self._kind):
                    self._scanned = end  # whole events, all preamble: held (docstring)
                    continue
                end = event_end(self._buffer)
                if end:
                    text = self._buffer[:end].decode("utf-8", errors="replace")
                    del self._buffer[:end]
                    self._scanned = 0
                    last_yield = loop.time()  # paced from here: before the consumer runs
                    self._yielded = True
                    yield text
                    target = self._pacing.next_target(target)
                if self._finished.is_set() and event_end(self._buffer) == 0:
                    if self._error is not None:
                        raise self._error
                    return
                if self._buffer and event_end(self._buffer):
                    self._arrived.set()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
