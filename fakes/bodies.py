"""The bodies the stand-in vLLM sends, as pure functions of the request.

Tests import them to rebuild exactly what was sent and compare byte for byte. JSON is
compact, as pydantic writes it. Two families:

- vLLM's (0.32, as observed on the CPU build): `completion`, `chat_steps` (a chat
  stream, one engine step at a time), `models`, `openapi`, `error`;
- the load tests': `stream_body` (events whose content names their stream and index, so
  a reordering shows) and `json_body` (a large answer carrying a SHA-256 it was given).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

MULTIBYTE = "aé€😀ß中ü🙂Ωж"  # 1, 2, 3 and 4 bytes in UTF-8
FINGERPRINT = "vllm-0.32.0-stand-in"
PROMPT_TOKENS = 10
DONE = b"data: [DONE]\n\n"


def compact(payload: Any) -> bytes:
    """JSON as vLLM (pydantic) writes it: no spaces, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def content(index: int) -> str:
    """Token `index`'s text: the stand-in's answers read `tok0 tok1 tok2 ...`."""
    return f"tok{index} "


def completion(request_id: str, model: str, tokens: int) -> bytes:
    """A non-streamed `chat.completion` of `tokens` tokens."""
    return compact({
        "id": request_id, "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "".join(content(i) for i in range(tokens)),
            "refusal": None, "annotations": None, "audio": None, "function_call": None,
            "tool_calls": [], "reasoning": None, "reasoning_content": None},
            "logprobs": None, "finish_reason": "length", "stop_reason": None,
            "token_ids": None, "routed_experts": None}],
        "service_tier": None, "system_fingerprint": FINGERPRINT,
        "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + tokens,
                  "completion_tokens": tokens, "prompt_tokens_details": None,
                  "completion_tokens_details": None},
        "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    })


def chat_steps(request_id: str, model: str, tokens: int, usage: bool,
               stamp: bool) -> Iterator[list[bytes]]:
    """A streamed chat completion's SSE events, one engine step (one token) at a time.

    The role chunk goes with token 0; the last token carries `finish_reason` and is
    followed, in the same step, by the usage chunk (`"choices": []`, when `usage`) and
    `[DONE]`. With `stamp`, a token's content is the CLOCK_MONOTONIC time its step began
    (token 0's is taken before the role chunk), so a reader on this machine can tell how
    long each event waited downstream; else it is `content(i)`.
    """
    prefix = (b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
              % (request_id.encode(), int(time.time()), compact(model)))
    role = (prefix + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
            b'"prompt_text":null}\n\n')
    token = prefix + b'"choices":[{"index":0,"delta":{"content":'
    middle = b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
    final = b'},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}\n\n'
    tail = [DONE]
    if usage:
        tail.insert(0, prefix + b'"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,'
                    b'"completion_tokens":%d},"system_fingerprint":"%s"}\n\n'
                    % (PROMPT_TOKENS, PROMPT_TOKENS + tokens, tokens, FINGERPRINT.encode()))
    for index in range(tokens):  # (content needs no JSON escaping; json.dumps costs 10x)
        text = b'"%.6f"' % time.monotonic() if stamp else b'"%s"' % content(index).encode()
        last = index == tokens - 1
        step = [role] if index == 0 else []
        step.append(token + text + (final if last else middle))
        yield step + tail if last else step


def models(served: str, root: str, adapters: dict[str, str] | None = None) -> bytes:
    """`GET /v1/models`: the model served, then its LoRA adapters (name: path), as vLLM
    lists them: the path as `root`, the model as `parent`."""
    now = int(time.time())
    card = {"id": served, "object": "model", "created": now, "owned_by": "vllm",
            "root": root, "parent": None, "max_model_len": 8192, "permission": []}
    loras = [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": path,
              "parent": served, "max_model_len": None, "permission": []}
             for name, path in (adapters or {}).items()]
    return compact({"object": "list", "data": [card, *loras]})


def openapi(paths: tuple[str, ...]) -> bytes:
    """`GET /openapi.json`: the routes served, which the worker reads to know them."""
    return compact({"openapi": "3.1.0", "info": {"title": "fake vllm"},
                    "paths": {path: {} for path in paths}})


def error(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """vLLM's OpenAI error body."""
    return compact({"error": {"message": message, "type": kind, "param": param,
                              "code": status}})


def event_text(stream: int, index: int, kind: str = "ascii", chars: int = 0) -> str:
    """A load event's content: unique per stream and index, so reordering shows."""
    if kind == "multibyte":
        body = "".join(MULTIBYTE[(stream + index + k) % len(MULTIBYTE)] for k in range(chars))
        return f"{stream}.{index}:{body}"
    return f"{stream}.{index} "


def event(stream: int, index: int, kind: str = "ascii", chars: int = 0) -> bytes:
    delta = {"content": event_text(stream, index, kind, chars)}
    return b"data: " + compact({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


def stream_body(stream: int, events: int, kind: str = "ascii", chars: int = 0) -> bytes:
    """Exactly what a finite load stream sends: its events, then `[DONE]`."""
    return b"".join(event(stream, i, kind, chars) for i in range(events)) + DONE


def json_body(size: int, received_sha256: str = "") -> bytes:
    """A chat.completion holding at least `size` bytes of multi-byte text."""
    unit = MULTIBYTE * 8
    text = unit * (size // len(unit.encode()) + 1)
    return compact({"id": "chatcmpl-load", "object": "chat.completion",
                    "received_sha256": received_sha256,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}]})
