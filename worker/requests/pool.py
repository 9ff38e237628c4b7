"""The one connection pool to vLLM: httpx's API, on aiohttp's C parser.

httpx's own transport (httpcore and h11, pure Python) cost about four times the CPU per
relayed event of `httpx_aiohttp.AiohttpTransport`, which runs each request on aiohttp
(llhttp underneath) and keeps httpx's API. What the pool promises:
- `REQUEST_TIMEOUT` is the read timeout (vLLM silent that long), 10 s to connect;
- no connection limit below what the worker can have in flight (`limit`: its concurrency
  times its models; the transport's own default would cap at 100);
- idle connections are kept for reuse, for less than vLLM's own keep-alive (5 s), so the
  pool never picks one vLLM is closing;
- `Accept-Encoding: identity` (vLLM's bytes are relayed as sent), and vLLM's `--api-key`
  when the deployment gave one.
The transport maps aiohttp's exceptions to httpx's by a coarse table (a refused connect
comes out as `ConnectTimeout`, a server that drops the connection too, and some not at
all); `Transport` gives each failure the httpx type that says what happened, which is
what the proxy's verdicts read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

CONNECT_TIMEOUT = 10.0
KEEP_IDLE = 4.0  # seconds an idle connection is kept (vLLM's uvicorn closes them at 5)
PIECE = 1 << 20  # aiohttp writes a body of raw bytes in one go, and warns above this size


def request_body(content: bytes) -> tuple[bytes | AsyncIterator[bytes], dict[str, str]]:
    """A request body as the transport should get it, and the headers it needs: a large one
    in pieces (with its length, so it is not sent chunked), written as the socket takes them."""
    if len(content) <= PIECE:
        return content, {}

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(content), PIECE):
            yield content[start:start + PIECE]

    return pieces(), {"Content-Length": str(len(content))}


def remap(exc: Exception) -> Exception:
    """The httpx error that says what went wrong, for any failure of the transport."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    if not isinstance(cause, (aiohttp.ClientError, OSError)):
        return exc  # httpx's own (or not a transport failure at all)
    message = (str(cause) or type(cause).__name__).split("\n")[0].rstrip(": ")
    if isinstance(cause, aiohttp.ClientResponseError):  # what aiohttp's parser refused
        reason = (cause.message or "").split("\n")[0].rstrip(": ")
        return httpx.RemoteProtocolError(f"vLLM's answer is not valid HTTP ({reason})")
    if isinstance(cause, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(cause, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return httpx.ConnectError(message)
    if isinstance(cause, aiohttp.ClientPayloadError):
        return httpx.ReadError(message)
    return httpx.RemoteProtocolError(message)


class _Body(httpx.AsyncByteStream):
    """A response body whose failures are remapped as the request's are."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            raise remap(exc) from exc

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        except Exception as exc:
            raise remap(exc) from exc


class Transport(httpx.AsyncBaseTransport):
    """aiohttp's transport for httpx, its failures remapped (module docstring)."""

    def __init__(self, limit: int) -> None:
        self._inner = AiohttpTransport(limits=httpx.Limits(
            max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=KEEP_IDLE))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            raise remap(exc) from exc
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def make_client(request_timeout: float, api_key: str | None, limit: int) -> httpx.AsyncClient:
    """The shared client (make it in the loop that uses it: asyncio pools are loop-bound)."""
    return httpx.AsyncClient(
        transport=Transport(limit),
        timeout=httpx.Timeout(request_timeout, connect=CONNECT_TIMEOUT),
        headers={"Accept-Encoding": "identity",
                 **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
