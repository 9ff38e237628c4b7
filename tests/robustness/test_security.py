"""Security: no secret leaks anywhere, vLLM is reachable from loopback only, the local
endpoint guards itself, and no setting ever passes through a shell.

Secrets are random per run; each test captures everything a person could read (the
worker's log, every post the platform received, job outputs and errors, the local
endpoint's log and answers, the diagnostic's text and JSON) and searches it for them.
Processes run for real: `python handler.py` under the fake job API, `python
local_endpoint.py` in front of a fake vLLM, `python test_vllm_command.py`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer

from fakes.platform import Platform
from fakes.vllm import free_port
from support import SERVED, LocalEndpoint, proxy_to, stand_in_python
from support.workers import CHAT, Worker, model_folder, serving
from worker.serve import api_key
from worker.settings.loader import load
from worker.upstream.child import group_members

PROJECT = Path(__file__).resolve().parents[2]


def fresh(prefix: str) -> str:
    return f"{prefix}{os.urandom(10).hex()}"


@pytest.fixture
def secrets() -> dict[str, str]:
    """Secret-looking variables a deployment may carry, HF_TOKEN and *_KEY/*_TOKEN among them."""
    return {"HF_TOKEN": fresh("hf_"), "LOCAL_API_KEY": fresh("local-key-"),
            "WANDB_API_KEY": fresh("wandb-"), "MY_SERVICE_TOKEN": fresh("svc-"),
            "AWS_SECRET_ACCESS_KEY": fresh("aws-"), "DB_PASSWORD": fresh("pw-")}


@pytest.fixture
def flag_secrets() -> dict[str, str]:
    """Secrets given to vLLM as flags in VLLM_EXTRA_ARGS, and the value of that variable."""
    values = {"api_key": fresh("sk-live-"), "hf_token": fresh("hf_flag_")}
    values["VLLM_EXTRA_ARGS"] = (f"--api-key {values['api_key']} --hf-token={values['hf_token']}"
                                 " --seed 1")
    return values


def leaks(texts: list[str], secrets: list[str]) -> list[str]:
    """Each secret found in any of the texts (an empty list is the only good answer)."""
    return [secret for secret in secrets if any(secret in text for text in texts)]


# ------------------------------------------------------------------ the worker --

def test_no_secret_reaches_the_log_or_the_platform_even_when_vllm_prints_them(
        start_workers: Callable[..., Worker], job_platform: Platform,
        secrets: dict[str, str], flag_secrets: dict[str, str]) -> None:
    """vLLM here prints its environment's HF_TOKEN and its whole command line (as an
    `unrecognized arguments` error would), then dies and is quoted: nothing may show."""
    platform = job_platform
    worker = serving(start_workers(**secrets, VLLM_EXTRA_ARGS=flag_secrets["VLLM_EXTRA_ARGS"],
                                   FAKE_VLLM_PRINT_ENV="HF_TOKEN", FAKE_VLLM_PRINT_ARGV="1"),
                     platform)
    jobs = [platform.queue_job(job) for job in (
        {"openai_route": "/v1/chat/completions", "openai_input": CHAT},
        {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "stream": True}},
        {"openai_route": "/v1/chat/completions", "openai_input": {**CHAT, "model": "other"}},
        {"openai_route": "/collective_rpc", "openai_input": {}},
        {"messages": "not a list"},
    )]
    results = [platform.result(job_id) for job_id in jobs]
    os.kill(worker.vllm_pid(), signal.SIGKILL)  # the death report quotes vLLM's last lines
    assert worker.exit_code(timeout=10) != 0

    log = worker.log()
    everything = [log, *platform.received, json.dumps(results)]
    assert leaks(everything, [*secrets.values(), flag_secrets["api_key"],
                              flag_secrets["hf_token"]]) == []
    assert "environment HF_TOKEN=***" in log, "vLLM printed it, masked"
    assert "--api-key *** --hf-token=*** --seed 1" in log, "the command line, masked"
    assert "killed by SIGKILL while serving" in log
    assert [set(result) for result in results] == [{"output"}] * 2 + [{"error"}] * 3


def listening_addresses(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def test_the_vllm_child_listens_on_loopback_only(
        start_workers: Callable[..., Worker], job_platform: Platform) -> None:
    port = free_port()
    worker = serving(start_workers(VLLM_PORT=str(port)), job_platform)
    assert group_members(worker.vllm_group())
    assert listening_addresses(port) == ["0100007F"]


@pytest.mark.parametrize("extra", ["--seed 1 --host=0.0.0.0", "--hos 0.0.0.0"])
def test_extra_args_that_would_expose_vllm_beyond_loopback_stop_the_worker_at_start(
        start_workers: Callable[..., Worker], job_platform: Platform, extra: str) -> None:
    """`--host` in VLLM_EXTRA_ARGS (or an abbreviation, which vLLM's argparse accepts)
    would win over the worker's, argparse keeping the last, and open vLLM's admin routes
    to the network: refused, before vLLM is started."""
    port = free_port()
    worker = start_workers(VLLM_PORT=str(port), VLLM_EXTRA_ARGS=extra)
    assert worker.exit_code(timeout=20) != 0
    assert "VLLM_EXTRA_ARGS must not set --host" in worker.log()
    assert not (worker.directory / "vllm.pid").exists(), "vLLM was never started"
    assert listening_addresses(port) == [] and job_platform.takes == 0


def test_every_setting_reaches_vllm_as_its_own_argv_item_never_through_a_shell(
        start_workers: Callable[..., Worker], job_platform: Platform,
        tmp_path: Path) -> None:
    """Values full of shell syntax arrive verbatim, and none of their commands ever ran."""
    marker = tmp_path / "pwned"
    hostile = {
        "VLLM_EXTRA_ARGS": (f"--note \"$(touch {marker}-a)\" --other '`touch {marker}-b`' "
                            f"--semi 'x; touch {marker}-c' --pipe 'y | touch {marker}-d' "
                            f"--quote \"it's\" --glob '*' --dollar '$HOME'"),
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE": f"name $(touch {marker}-e) & touch {marker}-f",
        "TOKENIZER": f"org/tok `touch {marker}-g`",  # any vLLM flag, by its variable
    }
    folder = model_folder(tmp_path / f"weights $(touch {marker}-h)")
    argv_file = tmp_path / "argv.json"
    worker = serving(start_workers(**hostile, MODEL_PATH=str(folder),
                                   FAKE_VLLM_ARGV_FILE=str(argv_file)), job_platform)

    argv = json.loads(argv_file.read_text())
    expected_extra = shlex.split(hostile["VLLM_EXTRA_ARGS"])
    assert argv[-len(expected_extra):] == expected_extra
    assert argv[argv.index("--served-model-name") + 1] == hostile[
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE"]
    assert argv[argv.index("--tokenizer") + 1] == hostile["TOKENIZER"]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pwned")) == []
    assert group_members(worker.vllm_group())


# -------------------------------------------------------- the local endpoint --

@pytest.fixture
def vllm_for_endpoint(fake_vllm: HTTPServer) -> HTTPServer:
    """A fake vLLM an endpoint can start against with VLLM_BASE_URL."""
    fake_vllm.expect_request("/health").respond_with_data("")
    fake_vllm.expect_request("/openapi.json").respond_with_json(
        {"paths": {"/v1/chat/completions": {}, "/v1/models": {}}})
    fake_vllm.expect_request("/v1/chat/completions").respond_with_json(
        {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]})
    return fake_vllm


@contextlib.contextmanager
def endpoint_process(tmp_path: Path, upstream: HTTPServer, env: dict[str, str],
                     *args: str) -> Iterator[tuple[int, Path]]:
    """`python local_endpoint.py` in front of `upstream`; its port and its log file."""
    port = free_port()
    log = tmp_path / f"endpoint-{port}.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "MODEL_NAME": SERVED,
                "VLLM_BASE_URL": upstream.url_for("/").rstrip("/"),
                "VLLM_STARTUP_TIMEOUT": "10", **env}
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "local_endpoint.py", "--port", str(port),
                                    *args], cwd=PROJECT, env=full_env, stdout=sink,
                                   stderr=subprocess.STDOUT, process_group=0)
    try:
        deadline = time.monotonic() + 20
        while "Local endpoint ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        yield port, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_local_endpoint_binds_loopback_unless_told_otherwise(
        tmp_path: Path, vllm_for_endpoint: HTTPServer) -> None:
    with endpoint_process(tmp_path, vllm_for_endpoint, {}) as (port, _):
        assert listening_addresses(port) == ["0100007F"]
    with endpoint_process(tmp_path, vllm_for_endpoint, {}, "--host", "0.0.0.0") as (port, _):
        assert listening_addresses(port) == ["00000000"]


def test_the_local_endpoint_keeps_its_key_and_every_secret_to_itself(
        tmp_path: Path, vllm_for_endpoint: HTTPServer, secrets: dict[str, str]) -> None:
    """401 without the right key; with it, the answer; the key never goes to vLLM, and no
    secret is in the endpoint's log or in any answer."""
    key = secrets["LOCAL_API_KEY"]
    answers = []
    with endpoint_process(tmp_path, vllm_for_endpoint, secrets) as (port, log):
        base = f"http://127.0.0.1:{port}/v2/local"
        for headers in ({}, {"Authorization": f"Bearer {key[:-1]}"},
                        {"Authorization": key}, {"Authorization": f"Basic {key}"}):
            answer = httpx.post(f"{base}/openai/v1/chat/completions", json=CHAT, headers=headers)
            assert answer.status_code == 401
            answers.append(answer.text)
        good = {"Authorization": f"Bearer {key}"}
        chat = httpx.post(f"{base}/openai/v1/chat/completions", json=CHAT, headers=good)
        refused = httpx.post(f"{base}/runsync", headers=good,
                             json={"input": {"openai_route": "/sleep", "openai_input": {}}})
        answers += [chat.text, refused.text, httpx.get(f"{base}/health", headers=good).text]
        assert chat.status_code == 200 and refused.json()["status"] == "FAILED"
    sent_upstream = [f"{request.headers}\n{request.get_data(as_text=True)}"
                     for request, _ in vllm_for_endpoint.log]
    assert any("/v1/chat/completions" in str(r.path) for r, _ in vllm_for_endpoint.log)
    assert not any("authorization" in text.lower() for text in sent_upstream)
    assert leaks([log.read_text(errors="replace"), *answers, *sent_upstream],
                 list(secrets.values())) == []


def test_the_api_key_is_compared_in_constant_time_on_every_request(
        fake_vllm: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`==` on the key would leak how much of a guess is right through timing."""
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return constant_time(given, expected)

    monkeypatch.setattr(api_key.hmac, "compare_digest", recording)
    proxy = proxy_to(fake_vllm)
    guesses = [b"Bearer", b"Bearer k", b"Bearer the-key-", b"Basic the-key-0",
               b"Bearer the-key-0" * 50]
    with LocalEndpoint(proxy, api_key="the-key-0") as endpoint:
        statuses = [httpx.get(f"{endpoint.url}/health").status_code]
        statuses += [httpx.get(f"{endpoint.url}/health", headers={"Authorization": g.decode()}
                               ).status_code for g in guesses]
    assert statuses == [401] * (1 + len(guesses))
    tokens = [guess.partition(b" ")[2].strip() for guess in [b"", *guesses]]
    assert compared == [(token, b"the-key-0") for token in tokens]


@pytest.mark.parametrize("path", ["/runsync", "/run", "/openai/v1/chat/completions"])
def test_a_chunked_body_over_the_limit_is_refused_without_a_content_length(
        fake_vllm: HTTPServer, path: str) -> None:
    """A client that streams its body gives no size up front: the limit holds anyway."""

    def chunks() -> Iterator[bytes]:
        yield b'{"input": {"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}]}}'

    proxy = proxy_to(fake_vllm)
    with LocalEndpoint(proxy, max_body=1000) as endpoint:
        answer = httpx.post(f"{endpoint.url}{path}", content=chunks())
    assert answer.status_code == 413 and "1000 bytes" in answer.json()["error"]["message"]
    assert fake_vllm.log == []


def test_an_unauthenticated_client_is_refused_before_its_body_is_read(
        fake_vllm: HTTPServer) -> None:
    proxy = proxy_to(fake_vllm)
    with LocalEndpoint(proxy, api_key="k3y-value", max_body=1000) as endpoint:
        answer = httpx.post(f"{endpoint.url}/runsync", content=b"x" * 5000)
    assert answer.status_code == 401


# ------------------------------------------------------------- the diagnostic --

@pytest.mark.parametrize("failing", [False, True], ids=["launch", "launch-that-fails"])
def test_the_diagnostic_prints_no_secret_in_text_or_json(
        tmp_path: Path, secrets: dict[str, str], flag_secrets: dict[str, str],
        failing: bool) -> None:
    """test_vllm_command.py shows settings, the command and vLLM's own lines (quoted
    again when it fails): with secrets in the environment and in VLLM_EXTRA_ARGS."""
    folder = model_folder(tmp_path / "m")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf"),
           "VLLM_PYTHON": stand_in_python(tmp_path), "VLLM_PORT": str(free_port()),
           "MODEL_PATH": str(folder), **secrets,
           "VLLM_EXTRA_ARGS": flag_secrets["VLLM_EXTRA_ARGS"],
           "FAKE_VLLM_PRINT_ENV": "HF_TOKEN", "FAKE_VLLM_PRINT_ARGV": "1"}
    if failing:
        env.update(FAKE_VLLM_EXIT_AFTER="0.5", FAKE_VLLM_HEALTHY_AFTER="30")
    outputs = []
    for extra in ([], ["--json"]):
        done = subprocess.run([sys.executable, "test_vllm_command.py", "--launch",
                               "--timeout", "20", *extra], cwd=PROJECT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == (5 if failing else 0), done.stdout + done.stderr
        outputs += [done.stdout, done.stderr]
    report = json.loads(outputs[2])

    assert leaks(outputs, [*secrets.values(), flag_secrets["api_key"],
                           flag_secrets["hf_token"]]) == []
    assert "environment HF_TOKEN=***" in outputs[0] + outputs[1]
    assert "--api-key *** --hf-token=*** --seed 1" in outputs[0] + outputs[1]
    assert isinstance(report, dict) and report["launch"]["healthy"] is not failing


def test_settings_treat_every_key_token_secret_and_password_variable_as_secret(
        secrets: dict[str, str]) -> None:
    """The masking everything above relies on starts here."""
    assert set(load(secrets).secrets) == set(secrets.values())


def test_the_local_endpoint_refuses_a_huge_request_head_at_once(
        tmp_path: Path, vllm_for_endpoint: HTTPServer) -> None:
    """It used to read a 120 MB header whole, stalling; now the head is bounded (the
    other limits, shared with the load-balancing server, are in serve/test_http_limits.py)."""
    with endpoint_process(tmp_path, vllm_for_endpoint, {}) as (port, _), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v2/x/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
        reply = sock.recv(4096)  # the rest of the head was read and dropped
    assert reply.startswith(b"HTTP/1.1 431 ")
