"""vLLM's streamed answer read as runs of whole SSE events, and the verdict on how it ended.

The one place that turns an upstream event stream into what a client may be given, for
every path (the job handler's relay, the local endpoint, the load-balancing server):
- each item is a run of whole events, cut only after a blank line, as soon as it arrives
  (no task, no buffering beyond an unfinished event), so no event and no UTF-8 character
  is ever split, and the items joined are vLLM's bytes as sent;
- `failure` says how it ended: None for a clean end; 502 when vLLM's stream stopped in the
  middle of an event or the connection broke; 503 when vLLM died or the worker ended it
  (`interrupt`, at the end of a drain: the whole events already read still go out); 504
  when vLLM sent nothing for REQUEST_TIMEOUT. Nothing raises out of the iteration but a
  cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol

import httpx

from worker.requests.errors import ProxyError
from worker.requests.sse import event_end


class Verdicts(Protocol):
    """What the proxy tells a reader: why streams are being ended, what a transport error
    means, and the set of open streams `interrupt` reaches."""

    @property
    def closing(self) -> str | None: ...

    async def transport_error(self, exc: BaseException) -> ProxyError: ...

    def tracking(self, stream: EventReader) -> contextlib.AbstractContextManager[None]: ...


class EventReader:
    """`async with EventReader(response, proxy) as events: async for chunk in events: ...`,
    then `events.failure` (module docstring)."""

    def __init__(self, response: httpx.Response, verdicts: Verdicts) -> None:
        self._response = response
        self._verdicts = verdicts
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()
        self._pending = b""
        self._closer: asyncio.Future[None] | None = None
        self.failure: ProxyError | None = None
        self.interrupted = False

    async def __aenter__(self) -> EventReader:
        self._scope = self._verdicts.tracking(self)
        self._scope.__enter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        trace: TracebackType | None) -> None:
        self._scope.__exit__(kind, exc, trace)
        if self._closer is not None:
            await asyncio.gather(self._closer, return_exceptions=True)

    def interrupt(self) -> None:
        """End the stream after the whole events read so far: closing vLLM's answer ends
        the read waiting on it (call in the reader's loop)."""
        if not self.interrupted:
            self.interrupted = True
            self._closer = asyncio.ensure_future(self._response.aclose())

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> bytes:
        while not self.interrupted:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                break
            except httpx.HTTPError as exc:
                if not self.interrupted:
                    self.failure = await self._verdicts.transport_error(exc)
                break
            except Exception:  # what closing the answer under a read raises (aiohttp's own)
                if not self.interrupted:
                    raise
                break
            if self._pending:
                chunk, self._pending = self._pending + chunk, b""
            end = len(chunk) if chunk.endswith(b"\n\n") else event_end(chunk)
            if end == len(chunk):
                return chunk
            self._pending = chunk[end:]
            if end:
                return chunk[:end]
        if self.interrupted:
            self.failure = ProxyError(503, self._verdicts.closing
                                      or "The stream was ended by the worker.")
        elif self.failure is None and self._pending.strip():
            self.failure = ProxyError(502, f"vLLM's stream ended in the middle of an event "
                                           f"({len(self._pending)} bytes cut off).")
        raise StopAsyncIteration
