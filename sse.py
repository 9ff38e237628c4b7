"""The formats of vLLM's event streams: where an event ends, what a failure looks like.

vLLM streams three kinds of server-sent events, one per API family
(`StreamKind`): OpenAI's chat and completions (`data: {json}` events ending in
`data: [DONE]`), the Responses API (`event: response.xxx` + `data:`, no
`[DONE]`), and Anthropic's Messages API (`event: xxx` + `data:`). An error after a
stream has started must arrive in-band, in the stream's own format, the way vLLM
itself sends one; `error_event` builds it.
"""

from __future__ import annotations

import json
from enum import StrEnum

from errors import ProxyError

# An SSE event ends with a blank line; the spec allows all three line endings.
BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class StreamKind(StrEnum):
    """Which format a route streams in (and so its in-band error format)."""

    OPENAI = "openai"
    RESPONSES = "responses"
    MESSAGES = "messages"


def event_end(buffer: bytes | bytearray) -> int:
    """Index just past the last complete SSE event in `buffer` (0 when there is none)."""
    end = 0
    for boundary in BOUNDARIES:
        found = buffer.rfind(boundary)
        if found >= 0:
            end = max(end, found + len(boundary))
    return end


def count_events(buffer: bytes | bytearray) -> int:
    """How many complete events `buffer` holds, whichever line endings it uses."""
    return sum(buffer.count(boundary) for boundary in BOUNDARIES)


def error_event(kind: StreamKind, error: ProxyError) -> str:
    """An in-band error event in the format of the stream it interrupts."""
    if kind is StreamKind.RESPONSES:
        event = {"type": "error", "code": str(error.status), "message": error.message,
                 "param": error.param}
        return f"event: error\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
    if kind is StreamKind.MESSAGES:
        event = {"type": "error", "error": {"type": "api_error", "message": error.message}}
        return f"event: error\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\ndata: [DONE]\n\n"
