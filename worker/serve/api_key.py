"""The API key check both HTTP servers make: `Authorization: Bearer <key>`, compared in
constant time. The scheme is matched without regard to case (RFC 9110 makes
authentication schemes case-insensitive); a request with two Authorization headers is
refused rather than have one of them silently win."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from worker.requests.errors import ProxyError

WANTED = "send 'Authorization: Bearer <key>'"


def refusal(headers: Iterable[tuple[bytes, bytes]], key: str | None) -> ProxyError | None:
    """Why a request with these (ASGI) headers is refused; None when it may pass."""
    if key is None:
        return None
    given = [value for name, value in headers if name == b"authorization"]
    if len(given) > 1:
        return ProxyError(400, f"The request has {len(given)} Authorization headers: {WANTED} "
                               "once.", None, "BadRequestError")
    scheme, _, token = (given[0] if given else b"").strip().partition(b" ")
    matches = hmac.compare_digest(token.strip(), key.encode())  # on every request alike
    if scheme.lower() != b"bearer" or not matches:
        return ProxyError(401, f"Missing or wrong API key: {WANTED}.")
    return None
