"""The README is the contract: each of its examples runs, as written, against the local
endpoint (the deployed URL swapped for the local one, as the README says to do)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

import test_fuzz
import test_load
from conftest import REPO, RealEndpoint
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


def test_the_reliability_table_names_real_tests_and_their_figures() -> None:
    """Each test file the README's Reliability section names exists, and the figures it
    quotes are the ones the tests use."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Reliability"):readme.index("## Troubleshooting")]
    named = set(re.findall(r"`(tests/test_\w+\.py)`", section))
    assert len(named) >= 6 and all((REPO / path).is_file() for path in named)
    streams, events = test_load.STREAMS, test_load.EVENTS
    assert f"{streams} concurrent streams of {events:,} events" in section
    assert f"{streams * events:,} events, 0 lost" in section
    assert f"{len(test_fuzz.HOSTILE_ROUTES)} job routes" in section
    assert f"{len(test_fuzz.ENDPOINT_PATHS)} raw paths" in section
    assert f"{test_fuzz.DEFAULT_EXAMPLES} examples per property" in section
    assert "FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py" in section
