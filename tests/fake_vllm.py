"""A stand-in for vLLM's OpenAI server, run as a real process by the tests.

Usage: python fake_vllm.py -m vllm.entrypoints.openai.api_server --model M --host H
       --port P --served-model-name N [any other vLLM flag, ignored]

It accepts the argv the worker builds for vLLM, so tests exercise the real
command builder, and speaks vLLM's protocol closely enough for the worker:

- `GET /health`: 200 with an empty body once "loaded".
- `GET /openapi.json`: `{"paths": {...}}` listing the routes it serves, as vLLM does.
- `GET /v1/models`: `{"object": "list", "data": [{"id": N, "object": "model",
  "owned_by": "vllm", ...}]}`.
- `POST /v1/chat/completions`: a `chat.completion` body; with `"stream": true`
  HTTP/1.1 chunked `text/event-stream`, one `data: {json}\\n\\n` event per chunk:
  a role chunk, `max_tokens` (default 5) content chunks whose delta content is
  `tok<i> `, a usage chunk with `"choices": []` when
  `stream_options.include_usage` is set, then `data: [DONE]\\n\\n`.
- A `model` other than the served name gets vLLM's 404 error body; unknown paths
  get FastAPI's `{"detail": "Not Found"}`.

While "loading" (see FAKE_VLLM_HEALTHY_AFTER) the port is bound but not
listening, so connections are refused, as with vLLM.

Misbehaviour switches (environment variables):

- FAKE_VLLM_HEALTHY_AFTER=<s>: start listening only after this many seconds.
- FAKE_VLLM_NEVER_HEALTHY=1: `/health` answers 503 forever.
- FAKE_VLLM_EXIT_AFTER=<s>: print a few lines ending in a traceback-like line,
  then exit with FAKE_VLLM_EXIT_CODE (default 1); 0 means at start, before
  listening.
- FAKE_VLLM_IGNORE_SIGTERM=1: the server ignores SIGTERM (otherwise it prints a
  line and exits 0 on SIGTERM).
- FAKE_VLLM_GRANDCHILD=obey|ignore-sigterm: spawn an engine-core-like process
  in the same process group that sleeps until killed, so it outlives the
  server; with `ignore-sigterm` it ignores SIGTERM.
- FAKE_VLLM_TOKEN_DELAY=<s>: sleep this long before each streamed content chunk.
- FAKE_VLLM_RECORD=<file>: append one JSON line per request served:
  `{"method", "path", "body", "status", "response"}` (`body` parsed as JSON when
  it is JSON, `response` the exact body text sent, streams included).
- FAKE_VLLM_PID_FILE=<file>: write the server's pid there at start.
- FAKE_VLLM_PRINT_ENV=<NAME>: print `NAME=<value>` at start, like a server
  that dumps its environment.
- FAKE_VLLM_PRINT_ARGV=1: print the whole argv at start, like a server quoting its
  command line in an error (`unrecognized arguments: ...`).
- FAKE_VLLM_ARGV_FILE=<file>: write the argv it was started with there, as a JSON list.
- FAKE_VLLM_PEAK_FILE=<file>: keep there the largest number of chat completions it has
  been serving at once.
- FAKE_VLLM_ANSWER_DELAY=<s>: wait this long before answering a non-streaming chat
  completion, after printing `INFO fake vllm: answering in <s> s`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_record_lock = threading.Lock()
_serving_lock = threading.Lock()
_serving = {"now": 0, "peak": 0}


def compact(payload: Any) -> str:
    """JSON as vLLM (pydantic) writes it: no spaces."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def say(text: str) -> None:
    """One line on stdout, flushed at once (the worker reads it through a pipe)."""
    print(text, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-m", dest="module")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", dest="served_model_name")
    parser.add_argument("--engine-core", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    args.served_model_name = args.served_model_name or args.model
    return args


def record(entry: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_VLLM_RECORD")
    if not path:
        return
    with _record_lock, open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def write_atomically(path: str, text: str) -> None:
    """Readers never see the file half-written."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(f"{path}.tmp", path)


def count_serving(change: int) -> None:
    """Track chat completions being served at once (FAKE_VLLM_PEAK_FILE)."""
    path = os.environ.get("FAKE_VLLM_PEAK_FILE")
    if not path:
        return
    with _serving_lock:
        _serving["now"] += change
        if _serving["now"] > _serving["peak"]:
            _serving["peak"] = _serving["now"]
            write_atomically(path, str(_serving["peak"]))


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
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--engine-core"],
                         stdin=subprocess.DEVNULL)
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(code: int) -> None:
    say("INFO fake vllm: loading the model weights")
    say("ERROR fake vllm: EngineCore failed to start")
    say(f"RuntimeError: simulated start-up failure (exit code {code})")
    os._exit(code)


ROUTES = ("/health", "/openapi.json", "/v1/models", "/v1/chat/completions")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served_model = "fake-model"
    root = "fake-model"

    def log_message(self, format: str, *args: Any) -> None:
        say(f"INFO:     {self.client_address[0]} - {format % args}")

    # ------------------------------------------------------------- helpers --
    def _body(self) -> tuple[Any, bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw), raw
        except ValueError:
            return raw.decode("utf-8", errors="replace"), raw

    def _send_json(self, status: int, payload: Any, body: Any = None) -> None:
        data = b"" if payload is None else compact(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        record({"method": self.command, "path": self.path, "body": body, "status": status,
                "response": data.decode()})

    def _error(self, status: int, message: str, error_type: str, body: Any) -> None:
        self._send_json(status, {"error": {"message": message, "type": error_type,
                                           "param": None, "code": status}}, body)

    # ------------------------------------------------------------- routes --
    def do_GET(self) -> None:
        if self.path == "/health":
            healthy = os.environ.get("FAKE_VLLM_NEVER_HEALTHY") != "1"
            self._send_json(200 if healthy else 503, None)
        elif self.path == "/openapi.json":
            self._send_json(200, {"openapi": "3.1.0", "info": {"title": "fake vllm"},
                                  "paths": {path: {} for path in ROUTES}})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{
                "id": self.served_model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.root, "parent": None, "max_model_len": 8192,
                "permission": []}]})
        else:
            self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body, _raw = self._body()
        if self.path != "/v1/chat/completions":
            self._send_json(404, {"detail": "Not Found"}, body)
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._error(400, "messages: field required", "BadRequestError", body)
            return
        if body.get("model") != self.served_model:
            self._error(404, f"The model `{body.get('model')}` does not exist.",
                        "NotFoundError", body)
            return
        tokens = int(body.get("max_tokens") or 5)
        count_serving(+1)
        try:
            if body.get("stream"):
                self._stream(body, tokens)
            else:
                if delay := float(os.environ.get("FAKE_VLLM_ANSWER_DELAY") or 0):
                    say(f"INFO fake vllm: answering in {delay:g} s")
                    time.sleep(delay)
                self._send_json(200, completion(self.served_model, tokens), body)
        finally:
            count_serving(-1)

    def _stream(self, body: dict[str, Any], tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY") or 0)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        sent: list[str] = []
        try:
            for index, event in enumerate(stream_events(self.served_model, tokens, usage)):
                if delay and 0 < index <= tokens:
                    time.sleep(delay)
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                sent.append(event)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            say("INFO fake vllm: client went away; aborting the request")
            self.close_connection = True
        record({"method": self.command, "path": self.path, "body": body, "status": 200,
                "response": "".join(sent)})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host (slow without a resolver)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def completion(model: str, tokens: int) -> dict[str, Any]:
    text = "".join(f"tok{i} " for i in range(tokens))
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                             "tool_calls": [], "reasoning_content": None},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "usage": {"prompt_tokens": 7, "total_tokens": 7 + tokens, "completion_tokens": tokens},
    }


def stream_events(model: str, tokens: int, usage: bool) -> list[str]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices, **extra}
        return f"data: {compact(payload)}\n\n"

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}])]
    for i in range(tokens):
        last = i == tokens - 1
        events.append(chunk([{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None,
                              "finish_reason": "length" if last else None}]))
    if usage:
        events.append(chunk([], usage={"prompt_tokens": 7, "total_tokens": 7 + tokens,
                                       "completion_tokens": tokens}))
    events.append("data: [DONE]\n\n")
    return events


def write_launcher(directory: Path) -> str:
    """An executable that runs this stand-in, to pass as VLLM_PYTHON.

    The worker runs `VLLM_PYTHON -m vllm.entrypoints.openai.api_server ...`; the
    launcher hands that argv over unchanged, so the real command builder is used.
    """
    launcher = directory / "fake-vllm-python"
    command = shlex.join([sys.executable, os.path.abspath(__file__)])
    launcher.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    launcher.chmod(0o755)
    return str(launcher)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.engine_core:
        engine_core()
        return
    say(f"INFO fake vllm: api server pid={os.getpid()} module={args.module} model={args.model}")
    if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("INFO fake vllm: ignoring SIGTERM")
    else:
        def on_sigterm(signum: int, frame: object) -> None:
            say("INFO fake vllm: SIGTERM received, shutting down")
            os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
    if pid_file := os.environ.get("FAKE_VLLM_PID_FILE"):
        write_atomically(pid_file, str(os.getpid()))
    if argv_file := os.environ.get("FAKE_VLLM_ARGV_FILE"):
        write_atomically(argv_file, json.dumps(sys.argv[1:]))
    if name := os.environ.get("FAKE_VLLM_PRINT_ENV"):
        say(f"INFO fake vllm: environment {name}={os.environ.get(name, '')}")
    if os.environ.get("FAKE_VLLM_PRINT_ARGV") == "1":
        say(f"INFO fake vllm: started as {' '.join(sys.argv[1:])}")
    if mode := os.environ.get("FAKE_VLLM_GRANDCHILD"):
        spawn_engine_core(mode)
    exit_code = int(os.environ.get("FAKE_VLLM_EXIT_CODE") or 1)
    exit_after = os.environ.get("FAKE_VLLM_EXIT_AFTER")
    if exit_after is not None:
        if float(exit_after) <= 0:
            fail(exit_code)
        timer = threading.Timer(float(exit_after), fail, args=(exit_code,))
        timer.daemon = True
        timer.start()

    Handler.served_model = args.served_model_name
    Handler.root = args.model
    server = Server((args.host, args.port), Handler, bind_and_activate=False)
    server.server_bind()
    time.sleep(float(os.environ.get("FAKE_VLLM_HEALTHY_AFTER") or 0))
    server.server_activate()
    say(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    server.serve_forever()


if __name__ == "__main__":
    main()
