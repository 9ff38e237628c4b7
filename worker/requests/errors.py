"""Every error a client can receive, built in one place, in OpenAI's shape.

`{"error": {"message", "type", "param", "code": <HTTP status>}}`. A job that
fails carries this object as JSON text in its `error` field (the Runpod SDK
turns a yielded `{"error": <str>}` into a FAILED job with exactly that text);
the local endpoint turns it back into the HTTP status and body. Errors that
happen after a stream has started are sent in-band, in the stream's own format
(sse.error_event).
"""

from __future__ import annotations

import json
from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


# vLLM messages that have a known fix on this worker: the fix is added to the message.
HINTS = (
    ('"auto" tool choice requires',
     "This worker runs vLLM without tool calling for this model: set TOOL_CALL_PARSER "
     "(and ENABLE_AUTO_TOOL_CHOICE=true) on the endpoint, or in OpenWebUI turn off the model's "
     '"Builtin Tools" capability (Admin Panel, Settings, Models).'),
)


class ProxyError(Exception):
    """A failure with the HTTP status a client should see."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.error_type)

    def job_output(self) -> dict[str, str]:
        """What the handler yields to end the job FAILED with this error."""
        return {"error": json.dumps(self.body(), ensure_ascii=False)}


def error_body(status: int, message: str, param: str | None = None,
               error_type: str | None = None) -> dict[str, Any]:
    default = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"error": {"message": message, "type": error_type or _TYPES.get(status, default),
                      "param": param, "code": status}}


def from_upstream(status: int, content: bytes) -> ProxyError:
    """vLLM's error answer as a ProxyError, keeping vLLM's own message and type."""
    text = content.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    inner = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(inner, dict) and inner.get("message"):
        error_type = inner.get("type") if isinstance(inner.get("type"), str) else None
        param = inner.get("param") if isinstance(inner.get("param"), str) else None
        message = str(inner["message"])
        message += "".join(f" {hint}" for known, hint in HINTS if known in message)
        return ProxyError(status, message, param, error_type)
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)
    return ProxyError(status, f"vLLM answered HTTP {status}: {text[:2000] or '(empty body)'}")


def parse_job_error(error: str) -> tuple[int, dict[str, Any]]:
    """HTTP status and body for a FAILED job's error text (anything not ours becomes a 500)."""
    try:
        body = json.loads(error)
        code = body["error"]["code"]
        if isinstance(code, int) and 400 <= code <= 599:
            return code, body
    except (ValueError, TypeError, KeyError):
        pass
    return 500, error_body(500, "The job failed inside the worker; see the worker's log.")
