"""A stand-in for vLLM's OpenAI server, run as a real process by the tests and the benchmarks.

Usage: python -m fakes.vllm [-m vllm.entrypoints.openai.api_server] [--model M] [--host H]
       [--port P] [--served-model-name N] [--disable-uvicorn-access-log] [--api-key K]
       [any vLLM flag]

It takes the argv the worker builds for vLLM, so it runs as the worker's child (through a
launcher passed as VLLM_PYTHON, `write_launcher`) and the real command builder is
exercised; it also runs on its own. One asyncio loop (fakes.http; uvloop when installed)
writes hundreds of streams at once, honouring TCP back-pressure, so it is never what a
load test or a benchmark measures. Standard library only.

Wire format, as vLLM 0.32 sends it (observed on the CPU build), bodies in fakes.bodies:
- uvicorn's headers (`date`, `server: uvicorn`, `content-type`, `vary: Origin`), and
  uvicorn's access line per request (`INFO:     127.0.0.1:5678 - "GET /health HTTP/1.1"
  200 OK`) unless `--disable-uvicorn-access-log`, as vLLM's own flag does;
- `GET /health`: 200 with an empty body once "loaded"; `GET /openapi.json`: `{"paths":
  {...}}` listing the vLLM routes below, as vLLM does; `GET /v1/models`: `{"object":
  "list", "data": [{"id": N, "object": "model", "owned_by": "vllm", "root": M, ...}]}`;
- `POST /v1/chat/completions`: a `chat.completion` whose content is `tok0 tok1 ... `, or
  with `"stream": true` HTTP/1.1 chunked `text/event-stream`, one `data: {json}\\n\\n`
  event per HTTP chunk: the role chunk written with the first token, one chunk per token
  with delta content `tok<i> ` (the last with `finish_reason`), the usage chunk
  (`"choices": []`) when `stream_options.include_usage` is set, then `data: [DONE]`;
  a body that is not a JSON object with a `messages` list: vLLM's 400 error body; a
  `model` other than the served name: vLLM's 404;
- any other path (routes match the path without its query string, and the method):
  FastAPI's 404 `{"detail": "Not Found"}`; while "loading" the port is bound but not
  listening, so connections are refused, as with vLLM;
- with `--enable-lora`, the `--lora-modules` adapters (`name=path` or JSON) are served by
  the chat route and listed by `/v1/models` after the model (`parent`: the model, `root`:
  the path); with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` too, `POST /v1/load_lora_adapter`
  (`{"lora_name", "lora_path"}`) adds one, answering vLLM's plain-text "Success: ...";
- with `--api-key K`, a 401 `{"error": "Unauthorized"}` for any `/v1` path without
  `Authorization: Bearer K`, as vLLM's own key guards only `/v1`.

Request fields read only here (vLLM would ignore them):
- `max_tokens`: content chunks (or tokens) to send (default 5);
- `bench_token_interval`: seconds between stream steps (default FAKE_VLLM_TOKEN_DELAY;
  0: as fast as the reader takes them): token i is written at start + i * interval;
- `bench_stamp`: each token's content is the CLOCK_MONOTONIC time it was written (token
  0's taken before the role chunk), so a reader can tell how long each event waited;
- `load_events` (with `load_stream`, an id): instead of vLLM's events, the bytes of
  `stream_body(load_stream, load_events, load_text, load_event_chars)` written in pieces
  of `load_piece` bytes (default 16381, one HTTP chunk each) that cut events and UTF-8
  characters anywhere; `load_text: "multibyte"` fills each event with `load_event_chars`
  characters of 1- to 4-byte UTF-8; `load_events: 0` streams one event every 10 ms (or
  every `bench_token_interval`) until the client goes away;
- `load_body_bytes` (not streamed): `json_body(load_body_bytes, sha)` instead, a JSON object
  of about that many bytes with the SHA-256 of the first message's content as received.
- `bench_digest` (streamed): keep the byte count and SHA-256 of the stream's body as
  written (HTTP chunk framing aside), served once by `GET /digests` after the stream ends,
  so a reader far downstream can prove it got every byte without the stand-in keeping them.

Unpaced streams are written by one engine loop (one step of every stream per turn, as vLLM
emits one token per running request per engine step). A client that goes away aborts its
request: `INFO fake vllm: client went away; aborting the request`.

`GET /digests`: the digests of the `bench_digest` streams ended since the last call, as
JSON: `{"<chat id or load-<stream>>": [bytes, "<sha256 hex>", completed], ...}`; each is
handed out once, so a long benchmark's stand-in keeps only those not yet asked for.

`GET /stats`: what the server has seen, as JSON: `connections` (open now, besides the one
asking), `streams` (open now), `peak_streams`, `requests` (to the chat route),
`streams_done`, `streams_aborted`, `serving` (chat completions in progress, as vLLM's
running requests), `answers_aborted` (non-streamed ones whose client left). `POST
/stats/reset` zeroes the peak and the counters (not what is open).

Switches (environment variables):
- FAKE_VLLM_HEALTHY_AFTER=<s>: bind the port at start, listen only this many seconds later.
- FAKE_VLLM_NEVER_HEALTHY=1: `/health` answers 503 forever.
- FAKE_VLLM_EXIT_AFTER=<s>: print a few lines ending in `RuntimeError: simulated start-up
  failure (exit code <code>)`, then exit with FAKE_VLLM_EXIT_CODE (default 1); 0 means at
  start, before binding.
- FAKE_VLLM_IGNORE_SIGTERM=1: the server ignores SIGTERM (otherwise it prints
  `INFO fake vllm: SIGTERM received, shutting down` and exits 0).
- FAKE_VLLM_GRANDCHILD=obey|ignore-sigterm: spawn an engine-core-like process in the same
  process group that sleeps until killed, so it outlives the server; with
  `ignore-sigterm` it ignores SIGTERM.
- FAKE_VLLM_TOKEN_DELAY=<s>: the default `bench_token_interval`.
- FAKE_VLLM_ANSWER_DELAY=<s>: wait this long before answering a non-streamed chat
  completion, after printing `INFO fake vllm: answering in <s> s` (a request's own
  `bench_answer_delay` field wins); a client that leaves meanwhile aborts it.
- FAKE_VLLM_RECORD=<file>: append one JSON line per request served: `{"method", "path",
  "body", "status", "response"}` (`path` as sent, `body` parsed as JSON when it is JSON
  (None for a GET), `response` the exact body sent, streams included, even cut short;
  bytes that are not UTF-8 come back with `.encode("utf-8", "surrogateescape")`).
- FAKE_VLLM_PID_FILE=<file>: write the server's pid and its process group's id there at
  start (`<pid> <pgid>`).
- FAKE_VLLM_ARGV_FILE=<file>: write the argv it was started with there, as a JSON list.
- FAKE_VLLM_PRINT_ENV=<NAME>: print `INFO fake vllm: environment NAME=<value>` at start,
  like a server that dumps its environment.
- FAKE_VLLM_PRINT_ARGV=1: print `INFO fake vllm: started as <argv>` at start, like a
  server quoting its command line in an error (`unrecognized arguments: ...`).
- FAKE_VLLM_PEAK_FILE=<file>: keep there the largest number of chat completions it has
  been serving at once.
- FAKE_VLLM_REPORT=<file>: once listening, write `{"pid", "started", "listening"}` there
  (monotonic seconds; `started` is the process's start, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fakes.http import Server, run
from fakes.vllm_server import StandIn, Switches, say, write_atomically

PROJECT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's argv: the few flags that matter here; any other is accepted and ignored."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", dest="served_model_name")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true")
    parser.add_argument("--api-key", dest="api_key")
    parser.add_argument("--engine-core", action="store_true")
    parser.add_argument("--enable-lora", action="store_true")
    # As vLLM's: several values after one flag; a second flag replaces the first's.
    parser.add_argument("--lora-modules", nargs="+", default=[])
    args, _unknown = parser.parse_known_args(argv)
    args.served_model_name = args.served_model_name or args.model
    return args


def lora_module(given: str) -> tuple[str, str]:
    """One `--lora-modules` value, `name=path` or vLLM's JSON form: (name, path)."""
    if given.startswith("{"):
        module = json.loads(given)
        return module["name"], module["path"]
    name, _, path = given.partition("=")
    return name, path


def engine_core() -> None:
    """The grandchild: announce itself, then sleep until a signal ends it."""
    say(f"(EngineCore pid={os.getpid()}) engine core running")
    while True:
        time.sleep(3600)


def spawn_engine_core(mode: str) -> None:
    """Start the grandchild in this process group; SIG_IGN survives exec, so set it around it."""
    previous = signal.getsignal(signal.SIGTERM)
    if mode == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        subprocess.Popen([sys.executable, "-m", "fakes.vllm", "--engine-core"], cwd=PROJECT,
                         stdin=subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(code: int) -> None:
    """Die as vLLM does when its engine fails to load: a few lines, a traceback's last."""
    say("INFO fake vllm: loading the model weights")
    say("ERROR fake vllm: EngineCore failed to start")
    say(f"RuntimeError: simulated start-up failure (exit code {code})")
    os._exit(code)


def on_sigterm(signum: int, frame: object) -> None:
    """Exit 0 at once, as a vLLM that obeys SIGTERM does (the worker's stop expects it)."""
    say("INFO fake vllm: SIGTERM received, shutting down")
    os._exit(0)


def process_start() -> float:
    """This process's start on the monotonic clock (10 ms resolution, from /proc)."""
    with open("/proc/self/stat", "rb") as stat:
        ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


async def serve(app: StandIn, sock: socket.socket, switches: Switches, where: str) -> None:
    """Load for FAKE_VLLM_HEALTHY_AFTER (the port bound, not listening: refused), then serve."""
    if switches.exit_after is not None:
        asyncio.get_running_loop().call_later(switches.exit_after, fail, switches.exit_code)
    await asyncio.sleep(switches.healthy_after)
    server = await Server(app).listen(sock)
    if switches.report:
        write_atomically(switches.report, json.dumps({
            "pid": os.getpid(), "started": process_start(), "listening": time.monotonic()}))
    say(f"INFO:     Uvicorn running on {where} (Press CTRL+C to quit)")
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.engine_core:
        engine_core()
        return
    say(f"INFO fake vllm: api server pid={os.getpid()} module={args.module} model={args.model}")
    switches = Switches.read(os.environ)
    if switches.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("INFO fake vllm: ignoring SIGTERM")
    else:
        signal.signal(signal.SIGTERM, on_sigterm)
    if switches.pid_file:
        write_atomically(switches.pid_file, f"{os.getpid()} {os.getpgrp()}")
    if switches.argv_file:
        write_atomically(switches.argv_file, json.dumps(argv))
    if name := switches.print_env:
        say(f"INFO fake vllm: environment {name}={os.environ.get(name, '')}")
    if switches.print_argv:
        say(f"INFO fake vllm: started as {' '.join(argv)}")
    if switches.grandchild:
        spawn_engine_core(switches.grandchild)
    if switches.exit_after is not None and switches.exit_after <= 0:
        fail(switches.exit_code)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    runtime_lora = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in (
        "1", "true")
    app = StandIn(args.served_model_name, args.model, switches,
                  not args.disable_uvicorn_access_log, args.api_key,
                  dict(lora_module(m) for m in args.lora_modules),
                  args.enable_lora and runtime_lora)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C when run by hand
        run(serve(app, sock, switches, f"http://{args.host}:{args.port}"))


# ------------------------------------------------------- for its starters --

def free_port(count: int = 1) -> int:
    """A loopback TCP port nothing listens on right now, and the `count - 1` after it too
    (the worker gives each further model the next port).

    Chosen below the kernel's ephemeral range, and never twice in one process: a port of
    that range can go to any outgoing connection, or to vLLM's own internal sockets, between
    the choice and its use (a server that binds its port only once vLLM has loaded, a minute
    later, met exactly that)."""
    low = _ephemeral_low()
    while True:
        port = random.randrange(FIRST_PORT, max(low - count, FIRST_PORT + 1))
        span = range(port, port + count)
        if not _handed_out.intersection(span) and all(_free(p) for p in span):
            _handed_out.update(span)
            return port


FIRST_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def shell_command() -> str:
    """A /bin/sh command running this stand-in with the script's arguments, from any cwd."""
    return (f"PYTHONPATH={shlex.quote(str(PROJECT))}${{PYTHONPATH:+:$PYTHONPATH}} "
            f'exec {shlex.quote(sys.executable)} -m fakes.vllm "$@"')


def write_launcher(directory: Path) -> str:
    """An executable that runs this stand-in, to pass as VLLM_PYTHON.

    The worker runs `VLLM_PYTHON -m vllm.entrypoints.openai.api_server ...`; the
    launcher hands that argv over unchanged, so the real command builder is used.
    """
    launcher = directory / "fake-vllm-python"
    launcher.write_text(f"#!/bin/sh\n{shell_command()}\n")
    launcher.chmod(0o755)
    return str(launcher)


if __name__ == "__main__":
    main(sys.argv[1:])
