"""The README is the contract: each of its examples runs, as written, against the local
endpoint (the deployed URL swapped for the local one, as the README says to do)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from conftest import RealEndpoint
from support import readme_examples, run_readme_example
from test_e2e_models import EMBEDDING_EXAMPLES


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
    assert set(readme_examples()) == set(CHECKS) | set(EMBEDDING_EXAMPLES)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_readme_example_runs_against_the_local_endpoint(real_endpoint: RealEndpoint,
                                                        name: str) -> None:
    CHECKS[name](run_readme_example(name, real_endpoint.url, real_endpoint.api_key))
