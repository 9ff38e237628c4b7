"""Runpod's public endpoint API on one machine, in front of the handler the platform calls.

`python local_endpoint.py [--host 127.0.0.1] [--port 8080]` (what `make run` starts) runs the
worker's real start-up (settings, locate, spawn vLLM or use `VLLM_BASE_URL`, wait for
health, supervision), then serves Runpod's API (`/runsync`, `/run`, `/stream`, `/status`,
`/cancel`, `/purge-queue`, `/health`) and its OpenAI path (`/openai/v1/...`) for any
endpoint id, as worker/serve/local_api.py describes, through the same job handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from handler import Handler, failed_handler, make_handler
from worker.requests.relay import Pacing
from worker.serve.context import load_settings, serving
from worker.serve.http_limits import Server, config
from worker.serve.job_table import Jobs
from worker.serve.local_api import Endpoint
from worker.settings.loader import Settings
from worker.upstream.verdicts import Verdict


class _Server(Server):
    """uvicorn with the worker's limits, announcing the base URL once the socket listens."""

    banner = ""
    endpoint: Endpoint

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.banner, flush=True)


def _banner(host: str, port: int, model: str, api_key: str | None) -> str:
    base = f"http://{host}:{port}/v2/local"
    auth = ' -H "Authorization: Bearer $LOCAL_API_KEY"' if api_key else ""
    return (f"\nLocal endpoint ready, serving {model}\n"
            f"  Runpod API:     {base}/runsync  (/run, /status/<id>, /stream/<id>, /cancel/<id>)\n"
            f"  OpenAI base URL: {base}/openai/v1\n"
            f"  Try: curl -s {base}/openai/v1/chat/completions{auth} "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
            f"\"max_tokens\": 20}}'\n")


def make_server(args: argparse.Namespace, settings: Settings, run: Handler, direct: Handler,
                stopping: Callable[[], bool] = lambda: False, banner: str = "") -> _Server:
    """The endpoint in front of `run` (`direct` on the OpenAI path), ready to run."""
    endpoint = Endpoint(Jobs(run, settings.max_concurrency), settings.local_api_key,
                        settings.local_max_body_bytes, stopping, direct)
    server = _Server(config(endpoint.app, host=args.host, port=args.port))
    server.banner, server.endpoint = banner, endpoint
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    settings = load_settings(os.environ)

    def tell_failure(verdict: Verdict) -> None:  # every job fails with it, until the exit
        print(f"\nLocal endpoint up, answering every job with: {verdict.sentence}\n",
              flush=True)
        make_server(args, settings, failed_handler(verdict), failed_handler(verdict)).run()

    with serving(os.environ, settings, tell_failure=tell_failure) as service:
        proxy = service.proxy
        assert proxy is not None
        banner = _banner(args.host, args.port, settings.served_model_name,
                         settings.local_api_key)
        # The OpenAI path writes each item to its client at once: nothing to pace for.
        server = make_server(args, settings, make_handler(proxy), make_handler(
            proxy, Pacing(direct=True)), lambda: service.stopping, banner)
        service.in_flight = server.endpoint.in_flight
        server.run()
    sys.exit(0 if server.started else 1)


if __name__ == "__main__":
    main()
