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
import re
from enum import StrEnum

from worker.requests.errors import ProxyError

# An SSE event ends with a blank line; the spec allows all three line endings.
BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
_EVENT = re.compile(rb"(?s).*?(?:\r\n\r\n|\n\n|\r\r)")
# Events sent before the answer starts, by stream kind; any other event carries output.
PREAMBLE_EVENTS = {
    "responses": {b"response.created", b"response.in_progress", b"response.output_item.added",
                  b"response.content_part.added", b"response.reasoning_part.added"},
    "messages": {b"message_start", b"content_block_start", b"ping"},
}


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


def _openai_preamble(data: bytes) -> bool:
    """A chat chunk that carries no output: the role chunk (`content: ""`), nothing else."""
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None \
                or choice.get("text"):
            return False
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict) or any(
                value not in (None, "", []) for key, value in delta.items() if key != "role"):
            return False
    return True


def is_preamble(event: bytes, kind: StreamKind) -> bool:
    """Whether `event` (one whole event) comes before the answer: nothing a user would see
    (a chat stream's role chunk, `response.created`, `message_start`, ...). Anything not
    known to be preamble counts as output, so nothing unexpected is ever held back."""
    name, data = b"", b""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if kind is StreamKind.OPENAI:
        return not name and _openai_preamble(data)
    return name in PREAMBLE_EVENTS[kind.value]


def first_output_end(buffer: bytes | bytearray, start: int, kind: StreamKind) -> int:
    """Index just past the first whole event from `start` on that carries output (0: none
    yet; whole preamble events before it are skipped)."""
    for match in _EVENT.finditer(buffer, start):
        if not is_preamble(match.group(0), kind):
            return match.end()
    return 0
