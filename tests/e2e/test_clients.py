"""End to end: the real openai/anthropic clients and OpenWebUI's calls, through each server
clients talk to (the local endpoint's OpenAI path, and the load-balancing server), to a
real vLLM (CPU build) serving the tiny model the project builds."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from fakes.vllm import free_port
from support.real_vllm import REPO, RealEndpoint

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(served: RealEndpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.openai_base, api_key=served.api_key, max_retries=0)


def test_models_list_names_the_served_model(client: openai.OpenAI, served: RealEndpoint
                                            ) -> None:
    assert [model.id for model in client.models.list()] == [served.model]


def test_chat_completion_without_streaming(client: openai.OpenAI, served: RealEndpoint
                                           ) -> None:
    answer = client.chat.completions.create(model=served.model, messages=HELLO,
                                            max_tokens=8)
    assert answer.object == "chat.completion"
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8


def test_chat_stream_with_usage_chunk(client: openai.OpenAI, served: RealEndpoint) -> None:
    chunks = list(client.chat.completions.create(
        model=served.model, messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 8
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completions(client: openai.OpenAI, served: RealEndpoint) -> None:
    answer = client.completions.create(model=served.model, prompt="Once upon",
                                       max_tokens=5)
    assert answer.object == "text_completion" and isinstance(answer.choices[0].text, str)
    assert answer.usage is not None and answer.usage.completion_tokens == 5


def test_responses_without_and_with_streaming(client: openai.OpenAI,
                                              served: RealEndpoint) -> None:
    whole = client.responses.create(model=served.model, input="Hi", max_output_tokens=8)
    assert whole.object == "response" and whole.output
    events = [event.type for event in client.responses.create(
        model=served.model, input="Hi", max_output_tokens=8, stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"


def test_responses_stream_helper_reaches_completed(client: openai.OpenAI,
                                                   served: RealEndpoint) -> None:
    with client.responses.stream(model=served.model, input="Hi",
                                 max_output_tokens=8) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.id.startswith("resp")


def test_unknown_model_is_the_clients_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    assert "does not exist" in failure.value.message


def test_bad_body_is_the_clients_bad_request_error(client: openai.OpenAI,
                                                   served: RealEndpoint) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        client.chat.completions.create(model=served.model, messages=HELLO, max_tokens=-3)
    assert failure.value.status_code == 400 and "max_tokens" in failure.value.message


def test_anthropic_messages_through_the_same_base(served: RealEndpoint) -> None:
    claude = anthropic.Anthropic(base_url=served.anthropic_base,
                                 api_key=served.api_key, max_retries=0)
    message = claude.messages.create(model=served.model, max_tokens=8, messages=HELLO)
    assert message.type == "message" and message.usage.output_tokens > 0
    with claude.messages.stream(model=served.model, max_tokens=8,
                                messages=HELLO) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and final.stop_reason in {"max_tokens", "end_turn"}


def metric(real_endpoint: RealEndpoint, name: str) -> float:
    metrics = httpx.get(f"{real_endpoint.vllm_url}/metrics").text
    found = re.findall(rf"^vllm:{name}\{{[^}}]*\}} ([0-9.e+]+)$", metrics, re.M)
    assert found, f"vLLM's /metrics has no vllm:{name}"
    return sum(float(value) for value in found)


def running_requests(real_endpoint: RealEndpoint) -> float:
    return metric(real_endpoint, "num_requests_running")


def assert_generation_stopped(real_endpoint: RealEndpoint, before: float) -> None:
    """No request runs any more, and the tokens made are far fewer than asked for."""
    assert wait_for(lambda: running_requests(real_endpoint) == 0, 10)
    made = metric(real_endpoint, "generation_tokens_total") - before
    assert made < LONG["max_tokens"]


def wait_for(condition: object, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


LONG = {"messages": HELLO, "max_tokens": 30000, "ignore_eos": True, "stream": True}


def test_cancel_stops_the_generation_in_vllm(real_endpoint: RealEndpoint) -> None:
    before = metric(real_endpoint, "generation_tokens_total")
    job = httpx.post(f"{real_endpoint.url}/run", headers=real_endpoint.headers,
                     json={"input": LONG}).json()
    assert wait_for(lambda: running_requests(real_endpoint) >= 1)
    cancelled = httpx.post(f"{real_endpoint.url}/cancel/{job['id']}",
                           headers=real_endpoint.headers).json()
    assert cancelled["status"] == "CANCELLED"
    assert_generation_stopped(real_endpoint, before)


def test_a_client_that_leaves_mid_stream_stops_the_generation(served: RealEndpoint) -> None:
    before = metric(served, "generation_tokens_total")
    with httpx.stream("POST", f"{served.openai_base}/chat/completions",
                      headers=served.headers, json={"model": served.model, **LONG},
                      timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        chunks = answer.iter_bytes()
        next(chunks)
        assert wait_for(lambda: running_requests(served) >= 1)
    assert_generation_stopped(served, before)


def test_a_client_that_leaves_before_a_non_streamed_answer_stops_the_generation(
        served: RealEndpoint) -> None:
    """Nothing of a non-streamed answer comes before it is finished: the client going away
    must stop it all the same (vLLM's own running-requests figure says so)."""
    before = metric(served, "generation_tokens_total")
    body = json.dumps({"model": served.model, **LONG, "stream": False}).encode()
    path = served.openai_base.removeprefix("http://").split("/", 1)[1]
    host, port = served.url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /{path}/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {served.api_key}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        assert wait_for(lambda: running_requests(served) >= 1)
    assert_generation_stopped(served, before)


OPENWEBUI_HEADERS = {"Content-Type": "application/json", "Accept": "*/*",
                     "Accept-Encoding": "gzip, deflate, br"}


def test_openwebui_model_list_chat_stream_and_title_call(served: RealEndpoint) -> None:
    headers = {**OPENWEBUI_HEADERS, **served.headers}
    base = served.openai_base
    models = httpx.get(f"{base}/models", headers=headers, timeout=10).json()
    assert [m["id"] for m in models["data"]] == [served.model]
    chat = {"stream": True, "model": served.model, "messages": HELLO, "max_tokens": 16,
            "stream_options": {"include_usage": True}, "reasoning_effort": "low",
            "metadata_from_ui": {"chat_id": "abc"}}
    with httpx.stream("POST", f"{base}/chat/completions", headers=headers, json=chat) as answer:
        assert answer.status_code == 200
        assert "text/event-stream" in answer.headers["content-type"]
        lines = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] > 0
    title_prompt = "Generate a concise title for this chat. " + "The history goes here. " * 100
    title = httpx.post(f"{base}/chat/completions", headers=headers, timeout=60, json={
        "stream": False, "model": served.model, "max_tokens": 1000,
        "messages": [{"role": "user", "content": title_prompt}]})
    assert title.status_code == 200 and title.json()["object"] == "chat.completion"


def openwebui_tool(i: int) -> dict[str, object]:
    return {"type": "function", "function": {
        "name": f"builtin_tool_{i}", "description": f"Built-in tool number {i}.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}}


def test_openwebuis_default_chat_with_thirty_tools_streams(served: RealEndpoint) -> None:
    """OpenWebUI adds its built-in tools, without tool_choice, to every chat by default."""
    body = {"stream": True, "model": served.model, "messages": HELLO, "max_tokens": 16,
            "tools": [openwebui_tool(i) for i in range(30)]}
    with httpx.stream("POST", f"{served.openai_base}/chat/completions", json=body,
                      headers={**OPENWEBUI_HEADERS, **served.headers},
                      timeout=120) as answer:
        assert answer.status_code == 200, answer.read()
        assert "text/event-stream" in answer.headers["content-type"]
        lines = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "--tool-call-parser hermes" in served.log_text()


def test_the_routes_are_read_from_vllms_start_up_log_not_asked_for(
        served: RealEndpoint) -> None:
    """Asking vLLM's /openapi.json would cost the start over a second; the admin routes
    and the embedding routes (tests above and in test_e2e_models.py) show the list is right."""
    log = served.log_text()
    assert "Route: /v1/chat/completions, Methods: POST" in log
    assert "GET /openapi.json" not in log[:log.index("Serving tiny-chat")]


def test_vllm_listens_on_loopback_only(served: RealEndpoint) -> None:
    port = int(served.vllm_url.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"], listening


def test_no_secret_reaches_the_log(served: RealEndpoint) -> None:
    text = served.log_text()
    assert "[vllm]" in text  # the child's own lines are in the log too
    assert "hf_e2e_secret_token_value" not in text and served.api_key not in text


def test_vllm_flags_set_by_their_variables_are_what_vllm_reports_about_itself(
        served: RealEndpoint) -> None:
    """MAX_NUM_SEQS, ENABLE_PREFIX_CACHING and (from the Makefile) ENABLE_CHUNKED_PREFILL,
    as vLLM's own start-up lines state them."""
    lines = served.log_text().splitlines()
    given = next(line for line in lines if "non-default args:" in line)
    assert "'max_num_seqs': 8" in given
    assert "'enable_prefix_caching': False" in given
    assert "'enable_chunked_prefill': False" in given
    engine = next(line for line in lines if "Initializing a V1 LLM engine" in line)
    assert "enable_prefix_caching=False" in engine and "enable_chunked_prefill=False" in engine


def test_a_value_vllm_would_refuse_stops_the_worker_before_vllm_is_spawned(
        tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path), "MAX_NUM_SEQS": "lots",
           "VLLM_PORT": str(free_port())}
    done = subprocess.run(["make", "-s", "run", f"PORT={free_port()}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert ("Invalid setting: MAX_NUM_SEQS='lots' is not valid for --max-num-seqs: it must "
            "be a whole number.") in output
    assert "Starting vLLM" not in output and "[vllm]" not in output
