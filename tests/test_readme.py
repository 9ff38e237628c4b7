"""The README is the contract: each of its examples runs, as written, against the local
endpoint (the deployed URL swapped for the local one, as the README says to do)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from conftest import REPO, RealEndpoint

EXAMPLE = re.compile(r"^```(\w+) example=([\w-]+)\n(.*?)^```$", re.M | re.S)
DEPLOYED = "https://api.runpod.ai/v2/"


def examples() -> dict[str, tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    return {name: (language, code) for language, name, code in EXAMPLE.findall(text)}


def chat_completion(out: str) -> None:
    assert json.loads(out)["object"] == "chat.completion"


def chat_stream(out: str) -> None:
    events = [line for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def runsync(out: str) -> None:
    answer = json.loads(out)
    assert answer["status"] == "COMPLETED"
    assert answer["output"][0]["object"] == "chat.completion"


def printed_text(out: str) -> None:
    assert out.endswith("\n") and len(out) > 1


CHECKS: dict[str, Callable[[str], None]] = {
    "curl-chat": chat_completion,
    "curl-stream": chat_stream,
    "runsync": runsync,
    "runpod-client": printed_text,
    "openai-client": printed_text,
}


def test_every_readme_example_is_checked() -> None:
    assert set(examples()) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_readme_example_runs_against_the_local_endpoint(real_endpoint: RealEndpoint,
                                                        name: str) -> None:
    language, code = examples()[name]
    local_base = real_endpoint.url.removesuffix("/local") + "/"
    code = code.replace(DEPLOYED, local_base)
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" \
        else [sys.executable, "-c", code]
    env = {**os.environ, "ENDPOINT_ID": "local", "RUNPOD_API_KEY": real_endpoint.api_key,
           "RUNPOD_ENDPOINT_BASE_URL": local_base.rstrip("/")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    CHECKS[name](done.stdout)
