"""Bad input: any `job["input"]` is either proxied as a valid request or refused with a 400
that says what is wrong; no route outside the allowlist ever reaches vLLM.

The properties run under hypothesis: a few hundred examples per property by default,
`FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/robustness/test_fuzz.py` for a large run.
Every example drives the job handler to its end under a deadline (never hangs,
never raises) against a recording upstream in the same event loop, which checks what
actually went over the wire: one request, to an allowed route, with the right method,
and for a body a strict-JSON object naming a `model`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer

from handler import make_handler
from support import SERVED, LocalEndpoint, job_error, proxy_to, run_job
from support.figures import ENDPOINT_PATHS, EXAMPLES, HOSTILE_ROUTES
from worker.requests.contract import ALIASES, UPSTREAM_ROUTES, resolve_route
from worker.requests.proxy import Proxy
from worker.requests.relay import Pacing
from worker.upstream.target import Target

settings.register_profile("ci", max_examples=EXAMPLES, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
FUZZ = settings.get_profile("ci")
DEADLINE = 10.0  # seconds one job may take, however odd its input
ANSWER = {"object": "fuzz.answer", "ok": True}
RESPONSE_BY_ID = re.compile(r"/v1/responses/resp_[A-Za-z0-9_-]{1,128}(/cancel)?")


# ---------------------------------------------------------------- upstream --

@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """An HTTP/1.1 server in the fuzzing loop: records each request, answers ANSWER."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.url = ""
        self.serving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        """Close the server and the connections the proxy's pool still keeps open, so no
        task or socket of this loop outlives it."""
        self.server.close()
        for task in self.serving:
            task.cancel()
        await asyncio.gather(*self.serving, return_exceptions=True)
        await self.server.wait_closed()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = json.dumps(ANSWER).encode()
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {name.strip().lower(): value.strip()
                           for name, _, value in (line.partition(":") for line in lines[1:])
                           if name}
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                self.requests.append(Seen(method, target, headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.serving.discard(task)
            writer.close()


@dataclass
class Fuzzing:
    loop: asyncio.AbstractEventLoop
    recorder: Recorder
    proxy: Proxy

    def run(self, job_input: Any) -> tuple[list[Any], list[Seen]]:
        """The job's yields and the requests vLLM would have received."""
        self.recorder.requests.clear()
        handler = make_handler(self.proxy)

        async def drive() -> list[Any]:
            return [item async for item in handler({"id": "fuzz", "input": job_input})]

        items = self.loop.run_until_complete(asyncio.wait_for(drive(), DEADLINE))
        return items, list(self.recorder.requests)


@pytest.fixture(scope="module")
def fuzzing() -> Iterator[Fuzzing]:
    """One loop, one upstream and one proxy for all examples (a fresh one each would make
    the large run ten times slower without testing anything more)."""
    loop = asyncio.new_event_loop()
    recorder = Recorder()
    loop.run_until_complete(recorder.start())
    proxy = Proxy(Target(SERVED, recorder.url), request_timeout=5, pacing=Pacing(0))
    try:
        yield Fuzzing(loop, recorder, proxy)
    finally:
        loop.run_until_complete(proxy.aclose())
        loop.run_until_complete(recorder.stop())
        loop.close()


def strict_json(data: bytes) -> Any:
    """Parse as a strict JSON parser would: UTF-8 only, no NaN or Infinity."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def assert_valid_upstream_request(seen: Seen) -> None:
    path = seen.target
    assert path in UPSTREAM_ROUTES or RESPONSE_BY_ID.fullmatch(path), path
    expected = UPSTREAM_ROUTES[path][0] if path in UPSTREAM_ROUTES else (
        "POST" if path.endswith("/cancel") else "GET")
    assert seen.method == expected
    if seen.method == "GET" or path.endswith("/cancel"):
        assert seen.body == b"" and seen.headers.get("content-length", "0") == "0"
        return
    assert seen.headers["content-type"] == "application/json"
    assert int(seen.headers["content-length"]) == len(seen.body)
    body = strict_json(seen.body)
    assert isinstance(body, dict) and isinstance(body.get("model"), str)


def assert_says_what_is_wrong(items: list[Any]) -> dict[str, Any]:
    error = job_error(items)
    assert len(items) == 1
    assert error["code"] == 400 and error["type"] == "BadRequestError", error
    message = error["message"]
    assert isinstance(message, str) and len(message) >= 20 and "Traceback" not in message
    if error["param"] is not None:
        assert error["param"] in message or repr(error["param"]) in message, error
    return error


def assert_proxied_or_refused(fuzzing: Fuzzing, job_input: Any) -> str:
    """The property every input must satisfy; which of the two happened."""
    items, seen = fuzzing.run(job_input)
    if seen:
        assert len(seen) == 1, "one job, one upstream request"
        assert_valid_upstream_request(seen[0])
        assert items == [ANSWER]
        return "proxied"
    assert_says_what_is_wrong(items)
    return "refused"


# -------------------------------------------------------------- strategies --

ODD_TEXT = ["", " ", "\x00", "\ud800", "\udfff", "a\ud83d", "\u202e\u2066", "\ufeff", "🙂" * 3,
            "Z\u0351\u0352\u0353", "\r\n\r\n", "../../", "%2e%2e%2f", "\\", "null", "{}",
            "\u0000\u001f\u007f", "\U0010ffff", "e\u0301", "ﬀ"]
texts = (st.text(st.characters(blacklist_categories=()), max_size=40)
         | st.sampled_from(ODD_TEXT)
         | st.builds(lambda char, count: char * count,
                     st.sampled_from(["a", "é", "中", "🙂", "\x00", "\ud800"]),
                     st.integers(50_000, 600_000)))
scalars = (st.none() | st.booleans() | st.integers()
           | st.integers(min_value=-(2 ** 200), max_value=2 ** 200)
           | st.floats(allow_nan=True, allow_infinity=True) | texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)

KNOWN_ROUTES = sorted({*UPSTREAM_ROUTES, *ALIASES})
routes = (st.sampled_from(KNOWN_ROUTES) | st.sampled_from(HOSTILE_ROUTES)
          | st.from_regex(r"/(v1/)?responses/resp_[A-Za-z0-9_-]{1,12}(/cancel)?", fullmatch=True)
          | st.lists(st.sampled_from(["v1", "..", ".", "", "%2e", "chat", "completions",
                                      "models", "sleep", "collective_rpc", "responses"]),
                     max_size=5).map(lambda parts: "/" + "/".join(parts))
          | texts | json_values)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | texts},
    optional={"content": texts | json_values}), max_size=3)


def maybe(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's plausible values (mostly, or nearly every input would be refused), and any
    JSON value at all (every wrong type)."""
    return st.one_of(plausible, plausible, plausible, json_values)


BODY_FIELDS = {
    "model": maybe(st.just(SERVED) | texts),
    "messages": maybe(messages),
    "prompt": maybe(texts | st.lists(st.integers(0, 50_000), max_size=5)),
    "input": maybe(texts | st.lists(texts, max_size=3)),
    "query": maybe(texts),
    "docs": maybe(st.lists(texts, max_size=3)),
    "return_docs": maybe(st.booleans()),
    "stream": maybe(st.booleans()),
    "max_tokens": maybe(st.integers(-5, 100_000)),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "temperature": maybe(st.floats(0, 2)),
}
CONTROL_FIELDS = {
    "openai_route": routes,
    "sampling_params": maybe(st.fixed_dictionaries({}, optional=BODY_FIELDS)),
    "min_batch_size": maybe(st.integers(-3, 100)),
    "max_batch_size": maybe(st.integers(-3, 100)),
    "batch_size_growth_factor": maybe(st.floats(-1, 10)),
}
bodies = st.builds(lambda known, extra: {**extra, **known},
                   st.fixed_dictionaries({}, optional=BODY_FIELDS),
                   st.dictionaries(texts, json_values, max_size=2))
openai_shaped = st.builds(lambda control, body: {**control, "openai_input": body},
                          st.fixed_dictionaries({}, optional=CONTROL_FIELDS),
                          bodies | json_values)
plain_shaped = st.builds(lambda control, body: {**body, **control},
                         st.fixed_dictionaries({}, optional=CONTROL_FIELDS), bodies)
near_valid = (st.fixed_dictionaries({"openai_route": st.sampled_from(KNOWN_ROUTES),
                                     "openai_input": bodies})
              | st.builds(lambda body, route: {**body, **route}, bodies,
                          st.fixed_dictionaries({}, optional={"openai_route": routes})))
job_inputs = json_values | openai_shaped | plain_shaped | near_valid


# -------------------------------------------------------------- properties --

@FUZZ
@given(job_input=job_inputs)
@example(job_input={"messages": [], "min_batch_size": float("inf")})
@example(job_input={"messages": [], "max_batch_size": float("nan")})
@example(job_input={"messages": [], "batch_size_growth_factor": float("-inf")})
@example(job_input={"messages": [{"role": "user", "content": "\ud800"}]})
@example(job_input={"prompt": "x", "max_tokens": float("nan")})
@example(job_input={"openai_route": "/v1/models", "openai_input": {"model": 2 ** 200}})
def test_any_job_input_is_proxied_as_a_valid_request_or_refused_with_a_400(
        fuzzing: Fuzzing, job_input: Any) -> None:
    event(assert_proxied_or_refused(fuzzing, job_input))  # --hypothesis-show-statistics


@FUZZ
@given(route=routes, body=bodies | json_values)
def test_only_allowlisted_routes_ever_reach_vllm(fuzzing: Fuzzing, route: Any, body: Any
                                                ) -> None:
    """Whatever `openai_route` says, vLLM sees an allowlisted path or nothing at all."""
    items, seen = fuzzing.run({"openai_route": route, "openai_input": body})
    if isinstance(route, str) and route in HOSTILE_ROUTES:
        assert seen == [], f"{route!r} reached vLLM"
    if seen:
        assert_valid_upstream_request(seen[0])
        assert seen[0].target == resolve_route(route)[0]
    else:
        assert_says_what_is_wrong(items)


@pytest.mark.parametrize("shape", ["openai_route", "sampling_params", "max_batch_size",
                                   "messages", "openai_input", "whole_input"])
def test_input_nested_as_deep_as_json_parsing_allows_is_handled(
        fuzzing: Fuzzing, shape: str) -> None:
    """The SDK parses jobs with json.loads: about 900 levels can reach the handler."""
    deep = json.loads("[" * 900 + "]" * 900)
    job_input: Any = {
        "openai_route": {"openai_route": deep, "openai_input": {}},
        "sampling_params": {"messages": [], "sampling_params": deep},
        "max_batch_size": {"messages": [], "max_batch_size": deep},
        "messages": {"messages": deep},
        "openai_input": {"openai_route": "/v1/chat/completions", "openai_input": {"x": deep}},
        "whole_input": deep,
    }[shape]
    outcome = assert_proxied_or_refused(fuzzing, job_input)
    assert outcome == ("proxied" if shape in ("messages", "openai_input") else "refused")


# ---------------------------------------------------------- hostile routes --

@pytest.mark.parametrize("route", HOSTILE_ROUTES)
def test_hostile_routes_in_a_job_never_reach_vllm(
        fake_vllm: HTTPServer, proxy: Proxy, route: str) -> None:
    error = job_error(run_job(proxy, {"openai_route": route, "openai_input": {"x": 1}}))
    assert error["code"] == 400 and "allowed routes" in error["message"]
    assert fake_vllm.log == []


@pytest.mark.parametrize("path", ENDPOINT_PATHS)
def test_hostile_paths_under_the_local_endpoints_openai_base_never_reach_vllm(
        fake_vllm: HTTPServer, path: str) -> None:
    """Sent raw (no client-side normalisation of `..` or percent-escapes)."""
    proxy = proxy_to(fake_vllm, request_timeout=5)
    with LocalEndpoint(proxy) as endpoint:
        connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
        try:
            connection.request("POST", f"/v2/ep1/openai/v1/{path}", body=b"{}",
                               headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            status, body = answer.status, answer.read()
        finally:
            connection.close()
    assert status in (400, 404), (status, body)
    assert fake_vllm.log == []


def test_a_query_string_on_the_local_endpoint_never_reaches_vllm(fake_vllm: HTTPServer) -> None:
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(ANSWER)
    proxy = proxy_to(fake_vllm, request_timeout=5)
    with LocalEndpoint(proxy) as endpoint:
        connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
        try:
            connection.request("POST", "/v2/ep1/openai/v1/chat/completions?next=/sleep&x=1",
                               body=b'{"messages": []}',
                               headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            status, body = answer.status, json.loads(answer.read())
        finally:
            connection.close()
    assert status == 200 and body == ANSWER
    assert [(r.path, r.query_string) for r, _ in fake_vllm.log] == [
        ("/v1/chat/completions", b"")]


@pytest.fixture
def fuzzing_endpoint() -> Iterator[tuple[LocalEndpoint, Recorder]]:
    """The local endpoint in front of a recording upstream running in a loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    recorder = Recorder()
    asyncio.run_coroutine_threadsafe(recorder.start(), loop).result(10)
    proxy = Proxy(Target(SERVED, recorder.url), request_timeout=5)
    try:
        with LocalEndpoint(proxy) as endpoint:
            yield endpoint, recorder
    finally:
        asyncio.run_coroutine_threadsafe(recorder.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@settings(FUZZ, suppress_health_check=[*FUZZ.suppress_health_check,
                                       HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | json_values.map(
    lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")))
def test_any_local_endpoint_body_gets_a_json_answer_never_a_500(
        fuzzing_endpoint: tuple[LocalEndpoint, Recorder], body: bytes) -> None:
    """Whatever bytes a client posts, it gets a JSON answer below 500 (the endpoint shares
    the handler, so a valid job is proxied as the properties above require)."""
    endpoint, recorder = fuzzing_endpoint
    recorder.requests.clear()
    for path in ("/runsync", "/openai/v1/chat/completions"):
        connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=DEADLINE)
        try:
            connection.request("POST", f"/v2/ep1{path}", body=body,
                               headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            status, text = answer.status, answer.read()
        finally:
            connection.close()
        assert status < 500, (path, status, text[:300])
        assert isinstance(json.loads(text), dict)
    for seen in list(recorder.requests):
        assert_valid_upstream_request(seen)
