"""Which vLLM request a job's input becomes.

Accepted shapes of `job["input"]`:

1. Runpod's OpenAI path: `{"openai_route": "/v1/chat/completions", "openai_input": {...}}`;
   a bare `{"openai_route": "/v1/models"}` (or any GET route) has no body. worker-vllm's
   clients' `{"route": "/v1/completions", "body": {...}, "method": "POST"}` means the
   same (a body means POST, none GET, when `method` is not given).
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
it gets near vLLM.

This module owns both directions of the job contract, and is pure: `resolve`
turns an input into a `JobRequest` (the vLLM request, the stream pacing the job
asks for, and how to shape vLLM's answer) or raises `ProxyError`; `shape_answer`
gives vLLM's answer the shape the job asked for. proxy.py only does the I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from worker.requests.errors import ProxyError
from worker.requests.relay import Pacing
from worker.requests.sse import StreamKind
from worker.upstream.target import Target

_OPENAI, _RESPONSES, _MESSAGES = StreamKind.OPENAI, StreamKind.RESPONSES, StreamKind.MESSAGES
# vLLM path -> (method, stream kind). The kind selects the in-band error format.
UPSTREAM_ROUTES: dict[str, tuple[str, StreamKind]] = {
    "/v1/chat/completions": ("POST", _OPENAI),
    "/v1/completions": ("POST", _OPENAI),
    "/v1/responses": ("POST", _RESPONSES),
    "/v1/messages": ("POST", _MESSAGES),
    "/v1/messages/count_tokens": ("POST", _MESSAGES),
    "/v1/models": ("GET", _OPENAI),
    "/v1/embeddings": ("POST", _OPENAI),
    "/v1/score": ("POST", _OPENAI),
    "/v1/rerank": ("POST", _OPENAI),
    "/v2/rerank": ("POST", _OPENAI),
    "/score": ("POST", _OPENAI),
    "/rerank": ("POST", _OPENAI),
    "/pooling": ("POST", _OPENAI),
    "/classify": ("POST", _OPENAI),
    "/tokenize": ("POST", _OPENAI),
    "/detokenize": ("POST", _OPENAI),
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
# worker-vllm's per-job stream batching knobs -> the Pacing field each sets.
PACING_FIELDS = {"min_batch_size": "min_batch_size", "max_batch_size": "max_batch_size",
                 "batch_size_growth_factor": "growth_factor"}
CONTROL_FIELDS = ("openai_route", "openai_input", "sampling_params", *PACING_FIELDS)
SHAPES = ('accepted job inputs: {"openai_route": "/v1/chat/completions", "openai_input": {...}}, '
          '{"openai_route": "/v1/models"}, {"route": "/v1/completions", "body": {...}}, '
          '{"messages": [...]}, {"prompt": "..."}, '
          '{"input": ...} (embeddings or responses), {"query": "...", "docs": [...]} (rerank), '
          'with OpenAI fields at the top level or in "sampling_params"')


class Answer(Enum):
    """How vLLM's answer is given back to the job."""

    AS_IS = "as is"
    RERANK = "rerank"  # the embedding workers' rerank shape
    RERANK_DOCS = "rerank with documents"
    MODEL_LIST = "one model list"  # /v1/models of every vLLM, merged


@dataclass(frozen=True)
class UpstreamRequest:
    """One HTTP request to one vLLM."""

    method: str
    path: str
    body: dict[str, Any] | None
    kind: StreamKind
    target: Target


@dataclass(frozen=True)
class JobRequest:
    """Everything a job asks for: the vLLM request (one per vLLM for the merged model
    list), how to pace its stream, and how to shape the answer."""

    requests: tuple[UpstreamRequest, ...]
    pacing: Pacing
    answer: Answer = Answer.AS_IS

    @property
    def first(self) -> UpstreamRequest:
        return self.requests[0]


def allowed_routes() -> str:
    return ", ".join(sorted(UPSTREAM_ROUTES))


def route_for(route: object) -> tuple[str, str, StreamKind] | None:
    """The vLLM path, method and stream kind for a path a client names (None: none)."""
    if isinstance(route, str):
        candidate = route.rstrip("/")
        if match := _RESPONSE_BY_ID.match(candidate):
            path = f"/v1/responses/{match.group(1)}{match.group(2) or ''}"
            return path, "POST" if match.group(2) else "GET", _RESPONSES
        if _SAFE_PATH.match(candidate) and "//" not in candidate:
            path = ALIASES.get(candidate, candidate)
            if path in UPSTREAM_ROUTES:
                method, kind = UPSTREAM_ROUTES[path]
                return path, method, kind
    return None


def resolve_route(route: object) -> tuple[str, str, StreamKind]:
    """The vLLM path, method and stream kind for a route a job names, or ProxyError(400)."""
    if (found := route_for(route)) is not None:
        return found
    shown = repr(route)[:120]
    raise ProxyError(400, f"openai_route {shown} is not a route this worker serves; "
                          f"allowed routes: {allowed_routes()}.", "openai_route")


def resolve_http(method: str, path: str, model: object, targets: Sequence[Target]
                 ) -> UpstreamRequest:
    """The vLLM request for an HTTP request to the load-balancing server (body sent as it
    came), or ProxyError: 404 for a path not served (vLLM's admin routes above all), 405
    for the wrong method."""
    found = route_for(path)
    if found is None:
        raise ProxyError(404, f"{path[:120]} is not a route this worker serves; routes: "
                              f"{allowed_routes()}.", None, "NotFoundError")
    vllm_path, wanted, kind = found
    if method != wanted:
        raise ProxyError(405, f"{vllm_path} takes {wanted}, not {method}.", None,
                         "MethodNotAllowed")
    target = pick(targets, model)
    _check_served(target, vllm_path)
    return UpstreamRequest(method, vllm_path, None, kind, target)


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
        if target.serves(name):
            return target
    if len(targets) == 1:
        return targets[0]  # vLLM itself answers with its 404 and the names it knows
    served = ", ".join(t.name for t in targets)
    adapters = ", ".join(sorted(a for t in targets for a in t.adapters))
    also = f"; LoRA adapters: {adapters}" if adapters else ""
    raise ProxyError(404, f"The model `{name}` is not served here; served models: {served}"
                     f"{also}.", "model", "NotFoundError")


def requested_model(job_input: object) -> object:
    """The `model` a job input names, read as `resolve` reads it (None when it names none
    or the input is bad: `resolve` says why)."""
    try:
        return _request_body(job_input)[3].get("model")
    except ProxyError:
        return None


def body_model(body: bytes) -> object:
    """The `model` a request body to the load-balancing server names (to pick its vLLM),
    read as `requested_model` reads a job's; ProxyError(400) when it is not JSON."""
    try:
        parsed = json.loads(body)
    except ValueError:
        raise ProxyError(400, "The request body is not valid JSON.") from None
    return parsed.get("model") if isinstance(parsed, dict) else None


def _plain_route(body: dict[str, Any], target: Target, prompt_max_tokens: int
                 ) -> tuple[str, str, StreamKind, dict[str, Any], Answer]:
    """Route, method, kind, body and answer shape for a plain request, by its fields."""
    if "messages" in body:
        return "/v1/chat/completions", "POST", _OPENAI, body, Answer.AS_IS
    if "prompt" in body:
        return "/v1/completions", "POST", _OPENAI, {"max_tokens": prompt_max_tokens,
                                                   **body}, Answer.AS_IS
    if "query" in body and "docs" in body:  # the embedding workers' rerank shape
        rest = {k: v for k, v in body.items() if k not in ("docs", "return_docs")}
        answer = Answer.RERANK_DOCS if body.get("return_docs") else Answer.RERANK
        return "/rerank", "POST", _OPENAI, {**rest, "documents": body["docs"]}, answer
    if "input" in body:
        if target.pooling:
            return "/v1/embeddings", "POST", _OPENAI, body, Answer.AS_IS
        return "/v1/responses", "POST", _RESPONSES, body, Answer.AS_IS
    raise ProxyError(400, f"The job input has no request in it; {SHAPES}.")


def pacing_for(job_input: dict[str, Any], default: Pacing) -> Pacing:
    """The job's own worker-vllm batch knobs, when it sets them, over the worker's defaults."""
    values: dict[str, Any] = {}
    for field, attr in PACING_FIELDS.items():
        value = job_input.get(field)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if attr == "growth_factor" and number and 1 <= value < 1e6:
            values[attr] = float(value)
        elif attr != "growth_factor" and number and 1 <= value < 1e9 and value == int(value):
            values[attr] = int(value)
        else:
            rule = "a number from 1" if attr == "growth_factor" else "a whole number from 1"
            raise ProxyError(400, f"{field} must be {rule}; got {json.dumps(value)[:50]}.", field)
    return replace(default, **values) if values else default


def _from_worker_vllm(job_input: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """worker-vllm's `{"route", "body", "method"}` as the `openai_route` shape, and the
    method it asks for (a body means POST, none GET, when it names none)."""
    stray = sorted(set(job_input) - {"route", "body", "method", *PACING_FIELDS})
    if stray:
        raise ProxyError(400, f"Fields {stray} sit beside route; put them inside body.",
                         stray[0])
    method = job_input.get("method")
    if method is not None and method not in ("GET", "POST"):
        raise ProxyError(400, f"method must be GET or POST; got {json.dumps(method)[:50]}.",
                         "method")
    shaped = {"openai_route": job_input["route"],
              **{k: v for k, v in job_input.items() if k in PACING_FIELDS}}
    if job_input.get("body") is not None:
        shaped["openai_input"] = job_input["body"]
    return shaped, method or ("POST" if "openai_input" in shaped else "GET")


def _request_body(job_input: object
                  ) -> tuple[dict[str, Any], str | None, str | None, dict[str, Any]]:
    """(the input in the platform's shape, the method worker-vllm's shape asked for, the
    OpenAI route, the request body), or ProxyError."""
    if not isinstance(job_input, dict):
        raise ProxyError(400, f"The job input must be a JSON object; {SHAPES}.")
    asked_method = None
    if "route" in job_input and "openai_route" not in job_input:
        job_input, asked_method = _from_worker_vllm(job_input)
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
    else:
        body = _plain_body(job_input)
    _check_types(body)
    return job_input, asked_method, route, body


def resolve(job_input: object, targets: Sequence[Target], prompt_max_tokens: int,
            pacing: Pacing) -> JobRequest:
    """What a job input asks for (see the module docstring), or ProxyError."""
    job_input, asked_method, route, body = _request_body(job_input)
    answer = Answer.AS_IS
    target = pick(targets, body.get("model"))
    if route is not None:
        path, method, kind = resolve_route(route)
        if asked_method is not None and asked_method != method:
            raise ProxyError(400, f"{path} takes {method}, not {asked_method}.", "method")
    else:
        path, method, kind, body, answer = _plain_route(body, target, prompt_max_tokens)
    _check_served(target, path)
    pacing = pacing_for(job_input, pacing)
    if path == "/v1/models" and len(targets) > 1:
        every = tuple(UpstreamRequest("GET", path, None, kind, t) for t in targets)
        return JobRequest(every, pacing, Answer.MODEL_LIST)
    if method == "GET" or path.endswith("/cancel"):
        return JobRequest((UpstreamRequest(method, path, None, kind, target),), pacing)
    if not body:
        raise ProxyError(400, f"{path} needs a request body (openai_input); {SHAPES}.",
                         "openai_input")
    if "model" not in body:
        body = {"model": target.name, **body}
    return JobRequest((UpstreamRequest(method, path, body, kind, target),), pacing, answer)


def shape_answer(answers: Sequence[Any], how: Answer) -> Any:
    """vLLM's answer (one per request of the JobRequest) in the shape the job asked for."""
    if how is Answer.MODEL_LIST:
        listed = [m for body in answers if isinstance(body, dict)
                  for m in body.get("data", [])]
        return {"object": "list", "data": listed}
    body = answers[0]
    if how is Answer.AS_IS or not isinstance(body, dict) \
            or not isinstance(body.get("results"), list):
        return body
    # The embedding workers' rerank shape: results in document order, `document` as plain
    # text only with return_docs.
    results = []
    for result in sorted(body["results"], key=lambda r: r.get("index", 0)):
        shaped = {"relevance_score": result.get("relevance_score"), "index": result.get("index")}
        if how is Answer.RERANK_DOCS:
            document = result.get("document")
            shaped["document"] = document.get("text") if isinstance(document, dict) else document
        results.append(shaped)
    tokens = (body.get("usage") or {}).get("total_tokens", 0)
    return {"model": body.get("model"), "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _check_served(target: Target, path: str) -> None:
    """Refuse a route this model's vLLM does not have, saying which it has."""
    if target.routes is None or path not in UPSTREAM_ROUTES or path in target.routes:
        return
    what = " (an embedding or scoring model)" if target.pooling else ""
    has = ", ".join(sorted(target.routes & set(UPSTREAM_ROUTES)))
    raise ProxyError(404, f"{target.name}{what} does not serve {path}; it serves: {has}.",
                     None, "NotFoundError")
