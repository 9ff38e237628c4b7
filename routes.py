"""Which vLLM request a job's input becomes.

Accepted shapes of `job["input"]`:

1. Runpod's OpenAI path: `{"openai_route": "/v1/chat/completions", "openai_input": {...}}`;
   a bare `{"openai_route": "/v1/models"}` (or any GET route) has no body.
2. Plain requests: `messages` goes to chat completions, `prompt` to completions
   (with `max_tokens` = DEFAULT_MAX_TOKENS when unset, not vLLM's 16), `input`
   to embeddings for an embedding model and to responses otherwise, `query` with
   `docs` to rerank (the embedding workers' shapes); OpenAI fields sit at the top
   level or in `sampling_params` (which wins on a clash); an `openai_route`
   beside them picks the route instead.

The job's `model` picks the vLLM server when several models are served (the
first when none is named); a route the model's vLLM does not have is a 404
that lists the routes it has.

Only the serving routes in `UPSTREAM_ROUTES` can be reached; anything else
(vLLM's admin routes, `..`, URLs, query strings, encodings) is refused before
it gets near vLLM. Everything here is pure: `resolve` turns an input into an
`UpstreamRequest` or raises `ProxyError(400)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
          '{"input": ...} (embeddings or responses), {"query": "...", "docs": [...]} (rerank), '
          'with OpenAI fields at the top level or in "sampling_params"')


@dataclass(frozen=True)
class Target:
    """One vLLM server: the model name it serves, its URL, the routes it has (None: unknown)."""

    name: str
    base_url: str
    routes: frozenset[str] | None = None

    @property
    def pooling(self) -> bool:
        """An embedding, scoring or reranking model: one that does not generate text."""
        return self.routes is not None and "/v1/chat/completions" not in self.routes


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    body: dict[str, Any] | None
    kind: str
    target: Target
    reshape: str | None = None


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


def pick(targets: Sequence[Target], name: object) -> Target:
    """The vLLM server for a job's `model` (the first when none is named)."""
    if name is None:
        return targets[0]
    for target in targets:
        if target.name == name:
            return target
    if len(targets) == 1:
        return targets[0]  # vLLM itself answers with its 404 and the names it knows
    served = ", ".join(t.name for t in targets)
    raise ProxyError(404, f"The model `{name}` is not served here; served models: {served}.",
                     "model", "NotFoundError")


def _plain_route(body: dict[str, Any], target: Target, prompt_max_tokens: int
                 ) -> tuple[str, str, str, dict[str, Any], str | None]:
    """Route, method, kind, body and reshaping for a plain request, by its fields."""
    if "messages" in body:
        return "/v1/chat/completions", "POST", "openai", body, None
    if "prompt" in body:
        return "/v1/completions", "POST", "openai", {"max_tokens": prompt_max_tokens,
                                                    **body}, None
    if "query" in body and "docs" in body:  # the embedding workers' rerank shape
        rest = {k: v for k, v in body.items() if k not in ("docs", "return_docs")}
        reshape = "rerank-docs" if body.get("return_docs") else "rerank"
        return "/rerank", "POST", "openai", {**rest, "documents": body["docs"]}, reshape
    if "input" in body:
        if target.pooling:
            return "/v1/embeddings", "POST", "openai", body, None
        return "/v1/responses", "POST", "responses", body, None
    raise ProxyError(400, f"The job input has no request in it; {SHAPES}.")


def resolve(job_input: object, targets: Sequence[Target], prompt_max_tokens: int
            ) -> UpstreamRequest:
    """The vLLM request for a job input (see the module docstring), or ProxyError."""
    if not isinstance(job_input, dict):
        raise ProxyError(400, f"The job input must be a JSON object; {SHAPES}.")
    route = job_input.get("openai_route")
    reshape = None
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
    else:
        body = _plain_body(job_input)
    _check_types(body)
    target = pick(targets, body.get("model"))
    if route is not None:
        path, method, kind = resolve_route(route)
    else:
        path, method, kind, body, reshape = _plain_route(body, target, prompt_max_tokens)
    _check_served(target, path)
    if method == "GET" or path.endswith("/cancel"):
        return UpstreamRequest(method, path, None, kind, target)
    if not body:
        raise ProxyError(400, f"{path} needs a request body (openai_input); {SHAPES}.",
                         "openai_input")
    if "model" not in body:
        body = {"model": target.name, **body}
    return UpstreamRequest(method, path, body, kind, target, reshape)


def _check_served(target: Target, path: str) -> None:
    """Refuse a route this model's vLLM does not have, saying which it has."""
    if target.routes is None or path not in UPSTREAM_ROUTES or path in target.routes:
        return
    what = " (an embedding or scoring model)" if target.pooling else ""
    has = ", ".join(sorted(target.routes & set(UPSTREAM_ROUTES)))
    raise ProxyError(404, f"{target.name}{what} does not serve {path}; it serves: {has}.",
                     None, "NotFoundError")
