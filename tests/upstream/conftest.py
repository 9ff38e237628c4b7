"""The upstream tests' fixtures: stand-in vLLM children started with the worker's own argv,
and the root logger put back after a test replaces it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakes.vllm import free_port, write_launcher
from support.children import MODEL, SERVED, Started, kill_group
from worker.launch.command import build_command
from worker.settings.loader import load
from worker.upstream.child import VllmChild


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """Start the stand-in with the worker's real vLLM argv; every group is killed afterwards."""
    launcher = write_launcher(tmp_path)
    children: list[VllmChild] = []

    def start(**switches: str) -> Started:
        settings = load({"VLLM_PYTHON": launcher, "VLLM_PORT": str(free_port()),
                         "MODEL_NAME": SERVED})
        argv = build_command(settings, settings.models[0], MODEL, 0)
        child = VllmChild(argv, {**os.environ, **switches})
        children.append(child)
        child.start()
        return Started(child, settings.upstream_url)

    yield start
    for child in children:
        kill_group(child.pid)
        child.exit_reason(timeout=5)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back the root logger that `setup_logging` replaces (pytest's capture lives there)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)
