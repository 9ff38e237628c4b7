"""A throwaway ten-line reverse proxy (starlette + httpx), scenario 8's reference path (e).

Not the worker: the least a Python relay does (one httpx pool, the body as it came, the
answer's bytes as they arrive, no checks), to read the worker's CPU per token beside it
on the same machine at the same time. `UPSTREAM=<vLLM> python -m uvicorn
benchmarks.reference_proxy:app --port P` (uvicorn picks uvloop and httptools, as the
worker's servers do).
"""

import os

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

client = httpx.AsyncClient(base_url=os.environ.get("UPSTREAM", ""), timeout=600)


async def relay(request: Request) -> Response:
    upstream = await client.send(client.build_request(
        "POST", "/v1/chat/completions", content=await request.body(),
        headers={"content-type": "application/json"}), stream=True)
    return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code,
                             media_type=upstream.headers.get("content-type"),
                             background=BackgroundTask(upstream.aclose))


async def ping(_request: Request) -> Response:
    return Response("ok")


app = Starlette(routes=[Route("/v1/chat/completions", relay, methods=["POST"]),
                        Route("/ping", ping)])
