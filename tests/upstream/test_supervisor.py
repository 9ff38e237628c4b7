"""wait_healthy against the stand-in vLLM running as a real process: a death while
starting, a vLLM never healthy."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from support.children import Started
from worker.upstream.supervisor import StartupError, wait_healthy


@pytest.mark.parametrize("switches", [
    {"FAKE_VLLM_EXIT_AFTER": "0"},
    {"FAKE_VLLM_EXIT_AFTER": "0.5", "FAKE_VLLM_HEALTHY_AFTER": "30"},
], ids=["at-start", "while-loading"])
def test_death_during_start_up_names_the_exit_code_and_quotes_the_last_lines(
        spawn: Callable[..., Started], switches: dict[str, str]) -> None:
    """The error must say what happened without waiting for the start-up timeout."""
    started = spawn(FAKE_VLLM_EXIT_CODE="3", **switches)
    began = time.monotonic()

    with pytest.raises(StartupError) as raised:
        wait_healthy(started.url, timeout=30, child=started.child)

    assert time.monotonic() - began < 10
    message = str(raised.value)
    assert "vLLM exited with code 3 during start-up" in message
    assert "ERROR fake vllm: EngineCore failed to start" in message
    assert message.rstrip().endswith("RuntimeError: simulated start-up failure (exit code 3)")


def test_never_healthy_raises_after_the_timeout_naming_the_setting(
        spawn: Callable[..., Started]) -> None:
    """The user must learn which setting to raise, and what vLLM printed meanwhile."""
    started = spawn(FAKE_VLLM_NEVER_HEALTHY="1")
    began = time.monotonic()

    with pytest.raises(StartupError) as raised:
        wait_healthy(started.url, timeout=1, child=started.child)

    assert 1 <= time.monotonic() - began < 5
    message = str(raised.value)
    assert "not healthy after 1 s (VLLM_STARTUP_TIMEOUT)" in message
    assert "Uvicorn running on" in message
    assert started.child.exit_reason() is None, "the caller decides when to stop it"


