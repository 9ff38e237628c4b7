"""A first start without the weights, end to end: the load-balancing server downloads the
tiny model from the stand-in Hub (fakes.hub, at a throttled rate, as the Hub is reached
through HF_ENDPOINT), logging its progress, and the real vLLM (CPU build) serves it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx

from fakes.hub import Hub
from fakes.vllm import free_port
from support.real_vllm import HELLO, REPO, real_vllm_env
from support.workers import kill_worker, start_worker, wait_until
from worker.launch.download_transfer import human_bytes

RATE = 150_000  # bytes/s: the tiny model's 0.85 MB take about 6 s, a few progress lines


def test_a_model_that_is_nowhere_on_disk_is_downloaded_with_progress_then_served(
        tmp_path: Path) -> None:
    root = tmp_path / "hub-root" / "tiny-org" / "tiny-chat"
    shutil.copytree(REPO / ".models" / "tiny-chat", root,
                    ignore=shutil.ignore_patterns(".built", "*.recipe"))
    port, vllm_port = free_port(), free_port()
    with Hub(tmp_path / "hub-root", rate=RATE) as hub:
        env = real_vllm_env(vllm_port, MODEL_PATH="", MODEL_NAME="tiny-org/tiny-chat",
                            HF_HUB_OFFLINE="", HF_ENDPOINT=hub.url, PORT=str(port))
        worker = start_worker(tmp_path / "worker", None, **env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ping(url) == 200, 900, "/ping 200", worker)
            answer = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "tiny-org/tiny-chat", "messages": HELLO, "max_tokens": 5})
            served = hub.stats()["served"]
        finally:
            kill_worker(worker)
    log = worker.log()
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
    assert served["tiny-org/tiny-chat/model.safetensors"] == 822600, "fetched once, whole"
    total = human_bytes(sum(served.values()))
    progress = re.findall(rf"Downloading tiny-org/tiny-chat: [\d.]+ k?B of {total} \(\d+%\), "
                          r"([\d.]+) (kB|MB)/s, ", log)
    assert progress, "a progress line every few seconds"
    for rate, unit in progress:  # what was served, at the stand-in's rate
        assert float(rate) * (1000 if unit == "kB" else 1e6) <= RATE * 1.25
    assert re.search(rf"Downloaded tiny-org/tiny-chat: {total} in [\d.]+ s", log)
    assert re.search(rf"Start-up of tiny-org/tiny-chat: downloaded {total} in [\d.]+ s, ", log)


def _ping(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/ping", timeout=5).status_code
    except httpx.TransportError:
        return None
