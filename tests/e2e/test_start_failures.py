"""Start-up failures a user meets first, on the real vLLM (CPU build): each ends in one
sentence naming the setting to change, the same in the three places a user looks: the
worker's last log line, a job sent to the local endpoint meanwhile (FAILED with it), and
the diagnostic (`test_vllm_command.py --launch --json`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fakes.vllm import free_port
from support.real_vllm import HELLO, REPO, real_vllm_env, vllm_processes
from support.workers import kill_worker, start_worker, wait_until


def unknown_architecture(tmp: Path) -> dict[str, str]:
    folder = tmp / "foobar-model"
    shutil.copytree(REPO / ".models" / "tiny-chat", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config,
                                                    "architectures": ["FooBarForCausalLM"]}))
    return {"MODEL_PATH": str(folder)}


CASES = {
    "context-too-long": (lambda tmp: {"MAX_MODEL_LEN": "4000000"},
                         ("MAX_MODEL_LEN", "32768")),
    "unsupported-architecture": (unknown_architecture, ("FooBarForCausalLM", "0.32")),
    "unknown-flag": (lambda tmp: {"VLLM_EXTRA_ARGS": "--no-enable-chunked-prefill "
                                                     "--not-a-real-flag"},
                     ("--not-a-real-flag", "VLLM_EXTRA_ARGS")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_known_failure_is_one_sentence_in_the_log_the_jobs_and_the_diagnostic(
        tmp_path: Path, case: str) -> None:
    make, words = CASES[case]
    vllm_port, port = free_port(), free_port()
    env = real_vllm_env(vllm_port, FAILED_START_SECONDS="5", **make(tmp_path))
    # The diagnostic launches a vLLM of its own (on a port of its own) while the worker's loads.
    with (tmp_path / "diagnostic.log").open("wb") as log:
        diagnostic = subprocess.Popen(
            [sys.executable, "test_vllm_command.py", "--launch", "--json", "--timeout", "300"],
            cwd=REPO, env={**env, "VLLM_PORT": str(free_port()), "HF_HOME": str(tmp_path / "hf"),
                           "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
            stdout=subprocess.PIPE, stderr=log, text=True)
    worker = start_worker(tmp_path / "endpoint", None, "local_endpoint.py", "--port",
                          str(port), **env)
    try:
        wait_until(lambda: "answering every job with" in worker.log(), 300, "the verdict",
                   worker)
        done = httpx.post(f"http://127.0.0.1:{port}/v2/local/runsync", timeout=30,
                          json={"input": {"messages": HELLO}}).json()
        assert worker.exit_code(timeout=60) == 1
        printed, _ = diagnostic.communicate(timeout=400)
    finally:
        kill_worker(worker)
        diagnostic.kill()
        diagnostic.wait()
    last = worker.log().strip().splitlines()[-1]
    sentence = last.split("Exiting: ", 1)[1]
    assert all(word.replace(",", "") in sentence.replace(",", "") for word in words), sentence
    assert done["status"] == "FAILED"
    assert json.loads(done["error"])["error"]["message"] == \
        f"The worker could not start: {sentence}"
    assert vllm_processes(vllm_port) == []

    report = json.loads(printed)
    assert report["verdict"]["sentence"] == sentence
    assert report["verdict"]["permanent"] is True
    assert report["error"].endswith(sentence)
