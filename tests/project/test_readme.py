"""The README is the contract: each of its examples runs, as written, against the local
endpoint (the deployed URL swapped for the local one, as the README says to do)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from support import figures, readme_examples, run_readme_example
from support.readme_checks import (
    CHECKS,
    EMBEDDING_EXAMPLES,
    LB_EXAMPLES,
    LORA_EXAMPLES,
    SETTINGS_EXAMPLES,
)
from support.real_vllm import REPO, RealEndpoint
from tiny_adapter import build
from worker.serve import http_limits


def test_every_readme_example_is_checked() -> None:
    assert set(readme_examples()) == set(CHECKS) | set(EMBEDDING_EXAMPLES) | set(
        SETTINGS_EXAMPLES) | set(LB_EXAMPLES) | set(LORA_EXAMPLES)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_readme_example_runs_against_the_local_endpoint(real_endpoint: RealEndpoint,
                                                        name: str) -> None:
    CHECKS[name](run_readme_example(name, real_endpoint.url, real_endpoint.api_key))


def test_the_reliability_table_names_real_tests_and_their_figures() -> None:
    """Each test file the README's Reliability section names exists, and the figures it
    quotes are the ones the tests use."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Reliability"):readme.index("## Troubleshooting")]
    named = set(re.findall(r"`(tests/(?:\w+/)?test_\w+\.py)`", section))
    assert len(named) >= 6 and all((REPO / path).is_file() for path in named)
    streams, events = figures.STREAMS, figures.EVENTS
    assert f"{streams} concurrent streams of {events:,} events" in section
    assert f"{streams * events:,} events, 0 lost" in section
    assert f"{len(figures.HOSTILE_ROUTES)} job routes" in section
    assert f"{len(figures.ENDPOINT_PATHS)} raw paths" in section
    assert f"{figures.DEFAULT_EXAMPLES} examples per property" in section
    assert "FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/robustness/test_fuzz.py" in section
    sizes = [f"{n / 1000:g} kB" if n < 1_000_000 else f"{n / 1e6:g} MB"
             for n in figures.ONE_WRITE_BODIES]
    assert f"bodies of {', '.join(sizes[:-1])} and {sizes[-1]} sent with their head" in section
    limits = (http_limits.HEAD_TIMEOUT, http_limits.BODY_TIMEOUT, http_limits.BODY_DEADLINE,
              http_limits.WRITE_TIMEOUT)
    assert "408 after {:g} s (head), {:g} s of silence or {:g} s in all (body), the connection " \
           "ended after {:g} s unread".format(*limits) in section


@pytest.mark.parametrize("name", sorted(SETTINGS_EXAMPLES))
def test_readme_settings_example_runs_as_written(name: str, tmp_path: Path) -> None:
    language, code = readme_examples()[name]
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    adapter = tmp_path / "hf" / "hub" / "models--acme--support-bot-lora"
    build(adapter / "snapshots" / "5e6f7a")
    (adapter / "refs").mkdir()
    (adapter / "refs" / "main").write_text("5e6f7a")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "MODEL_PATH": str(folder)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (language, done.returncode) == ("sh", 0), done.stdout + done.stderr
    SETTINGS_EXAMPLES[name](done.stdout)
