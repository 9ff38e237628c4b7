"""Which vLLM request a job's input becomes.

Accepted shapes of `job["input"]`:

1. Runpod's OpenAI path: `{"openai_route": "/v1/chat/completions", "openai_input": {...}}`;
   a bare `{"openai_route": "/v1/models"}` (or any GET route) has no body.
2. Plain requests: `messages` goes to chat completions, `prompt` to completions
   (with `max_tokens` = DEFAULT_MAX_TOKENS when unset, not vLLM's 16), `input`
   to responses; OpenAI fields sit at the top level or in `sampling_params`
   (which wins on a clash); an `openai_route` beside them picks the route instead.

Only the serving routes in `UPSTREAM_ROUTES` can be reached; anything else
(vLLM's admin routes, `..`, URLs, query strings, encodings) is refused before
it gets near vLLM. Everything here is pure: `resolve` turns an input into an
`UpstreamRequest` or raises `ProxyError(400)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from errors import ProxyError

# vLLM path -> (method, stream kind). The kind selects the in-band error format.
UPSTREAM_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("POST", "openai"),
    "/v1/completions": ("POST", "openai"),
    "/v1/responses": ("POST", "responses"),
    "/v1/messages": ("POST", "messages"),
    "/v1/messages/count_tokens": ("POST", "messages"),
    "/v1/models": ("GET", "openai"),
    "/v1/embeddings": ("POST", "openai"),
    "/v1/score": ("POST", "openai"),
    "/v1/rerank": ("POST", "openai"),
    "/v2/rerank": ("POST", "openai"),
    "/score": ("POST", "openai"),
    "/rerank": ("POST", "openai"),
    "/pooling": ("POST", "openai"),
    "/classify": ("POST", "openai"),
    "/tokenize": ("POST", "openai"),
    "/detokenize": ("POST", "openai"),
}
# Spellings clients use for the same routes: OpenAI paths without /v1, root paths with /v1.
ALIASES: dict[str, str] = {
    **{path.removeprefix("/v1"): path for path in UPSTREAM_ROUTES
       if path.startswith("/v1/") and path.removeprefix("/v1") not in UPSTREAM_ROUTES},
    **{f"/v1{path}": path for path in UPSTREAM_ROUTES
       if not path.startswith(("/v1/", "/v2/")) and f"/v1{path}" not in UPSTREAM_ROUTES},
}
# A stored response (`background`/`store`): GET it, or POST .../cancel.
_RESPONSE_BY_ID = re.compile(r"^/(?:v1/)?responses/(resp_[A-Za-z0-9_-]{1,128})(/cancel)?$")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_/-]{1,200}$")
CONTROL_FIELDS = ("openai_route", "openai_input", "sampling_params",
                  "max_batch_size", "min_batch_size", "batch_size_growth_factor")
SHAPES = ('accepted job inputs: {"openai_route": "/v1/chat/completions", "openai_input": {...}}, '
          '{"openai_route": "/v1/models"}, {"messages": [...]}, {"prompt": "..."}, '
          '{"input": ...} (responses), with OpenAI fields at the top level or in "sampling_params"')


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    body: dict[str, Any] | None
    kind: str


def allowed_routes() -> str:
    return ", ".join(sorted(UPSTREAM_ROUTES))


def resolve_route(route: object) -> tuple[str, str, str]:
    """The vLLM path, method and stream kind for a route a job names, or ProxyError(400)."""
    if isinstance(route, str):
        candidate = route.rstrip("/")
        if match := _RESPONSE_BY_ID.match(candidate):
            path = f"/v1/responses/{match.group(1)}{match.group(2) or ''}"
            return path, "POST" if match.group(2) else "GET", "responses"
        if _SAFE_PATH.match(candidate) and "//" not in candidate:
            path = ALIASES.get(candidate, candidate)
            if path in UPSTREAM_ROUTES:
                method, kind = UPSTREAM_ROUTES[path]
                return path, method, kind
    shown = repr(route)[:120]
    raise ProxyError(400, f"openai_route {shown} is not a route this worker serves; "
                          f"allowed routes: {allowed_routes()}.", "openai_route")


def _plain_body(job_input: dict[str, Any]) -> dict[str, Any]:
    params = job_input.get("sampling_params", {})
    if not isinstance(params, dict):
        raise ProxyError(400, "sampling_params must be a JSON object of OpenAI request fields.",
                         "sampling_params")
    body = {k: v for k, v in job_input.items() if k not in CONTROL_FIELDS}
    body.update(params)
    return body


def _check_types(body: dict[str, Any]) -> None:
    """Catch the shape mistakes vLLM would report less clearly."""
    if "messages" in body and not isinstance(body["messages"], list):
        raise ProxyError(400, "messages must be a list of {\"role\", \"content\"} objects.",
                         "messages")
    if "prompt" in body and not isinstance(body["prompt"], (str, list)):
        raise ProxyError(400, "prompt must be a string or a list of strings or token ids.",
                         "prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ProxyError(400, "stream must be true or false.", "stream")
    if "model" in body and not isinstance(body["model"], str):
        raise ProxyError(400, "model must be a string naming a served model.", "model")


def resolve(job_input: object, served_model: str, prompt_max_tokens: int) -> UpstreamRequest:
    """The vLLM request for a job input (see the module docstring), or ProxyError(400)."""
    if not isinstance(job_input, dict):
        raise ProxyError(400, f"The job input must be a JSON object; {SHAPES}.")
    route = job_input.get("openai_route")
    if "openai_input" in job_input:
        body = job_input["openai_input"]
        if not isinstance(body, dict):
            raise ProxyError(400, "openai_input must be a JSON object (the OpenAI request body).",
                             "openai_input")
        stray = sorted(set(job_input) - set(CONTROL_FIELDS))
        if stray:
            raise ProxyError(400, f"Fields {stray} sit beside openai_input; put them inside it.",
                             stray[0])
        if route is None:
            raise ProxyError(400, f"openai_input needs an openai_route; {SHAPES}.",
                             "openai_route")
        path, method, kind = resolve_route(route)
    else:
        body = _plain_body(job_input)
        if route is not None:
            path, method, kind = resolve_route(route)
        elif "messages" in body:
            path, method, kind = "/v1/chat/completions", "POST", "openai"
        elif "prompt" in body:
            path, method, kind = "/v1/completions", "POST", "openai"
            body.setdefault("max_tokens", prompt_max_tokens)
        elif "input" in body:
            path, method, kind = "/v1/responses", "POST", "responses"
        else:
            raise ProxyError(400, f"The job input has no request in it; {SHAPES}.")
    if method == "GET" or path.endswith("/cancel"):
        return UpstreamRequest(method, path, None, kind)
    if not body:
        raise ProxyError(400, f"{path} needs a request body (openai_input); {SHAPES}.",
                         "openai_input")
    _check_types(body)
    if "model" not in body:
        body = {"model": served_model, **body}
    return UpstreamRequest(method, path, body, kind)
