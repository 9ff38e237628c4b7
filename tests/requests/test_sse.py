"""The formats of vLLM's event streams: event boundaries and in-band error events."""

from __future__ import annotations

import json

from worker.requests.errors import ProxyError
from worker.requests.sse import StreamKind, count_events, error_event, event_end


def test_event_end_finds_the_last_blank_line() -> None:
    assert event_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert event_end(b"data: a\r\n\r\nda") == len(b"data: a\r\n\r\n")
    assert event_end(b"data: a\n") == 0


def test_events_are_counted_whatever_their_line_endings() -> None:
    assert count_events(b"") == 0
    assert count_events(b"data: a\n\ndata: b\n\ndata: c") == 2
    assert count_events(b"data: a\r\n\r\ndata: b\r\r") == 2


def test_an_in_band_error_takes_the_format_of_the_stream_it_ends() -> None:
    error = ProxyError(503, "vLLM is not running")
    chat = error_event(StreamKind.OPENAI, error)
    first, done = chat.split("\n\n")[:2]
    assert json.loads(first.removeprefix("data: "))["error"]["code"] == 503
    assert done == "data: [DONE]", "OpenAI clients stop reading at [DONE]"
    responses = error_event(StreamKind.RESPONSES, error)
    assert responses.startswith("event: error\ndata: ") and "[DONE]" not in responses
    assert json.loads(responses.split("data: ", 1)[1]) == {
        "type": "error", "code": "503", "message": "vLLM is not running", "param": None}
    messages = error_event(StreamKind.MESSAGES, error)
    assert json.loads(messages.split("data: ", 1)[1]) == {
        "type": "error", "error": {"type": "api_error", "message": "vLLM is not running"}}
    assert all(e.endswith("\n\n") for e in (chat, responses, messages))
