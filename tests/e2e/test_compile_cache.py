"""The compile cache on the volume, on the real vLLM (CPU build, tiny model): a second start
on the same "volume" (a temp folder) finds the first's cache and uses it, and the parts of
it left corrupt do not stop it (a volume that cannot be written: the load-balancing
server's, test_e2e_lb.py). Each start is the diagnostic's `--launch`, as a user would
run it, which starts vLLM as the worker does and reports its start-up timeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fakes.vllm import free_port
from support.real_vllm import REPO, real_vllm_python


def launch(volume: Path) -> tuple[dict[str, Any], str]:
    """`test_vllm_command.py --launch --json` with HF_HOME (and HOME) on `volume`: the
    report, and vLLM's log (stderr)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(volume / "home"),
           "HF_HOME": str(volume / "huggingface"), "HF_HUB_OFFLINE": "1",
           "MODEL_PATH": os.environ.get("TINY_MODEL_PATH", str(REPO / ".models" / "tiny-chat")),
           "VLLM_PYTHON": real_vllm_python(), "VLLM_PORT": str(free_port()),
           "GPU_MEMORY_UTILIZATION": "0.3", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "ENABLE_CHUNKED_PREFILL": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "test_vllm_command.py", "--launch", "--json",
                           "--timeout", "600"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    report = json.loads(done.stdout)
    assert report["ok"], (report["error"], done.stderr[-3000:])
    return report, done.stderr


def kernels(volume: Path) -> dict[Path, int]:
    """The compiled kernels in the volume's cache, with when each was written."""
    return {p: p.stat().st_mtime_ns for p in (volume / "vllm-cache").rglob("*.so")}


def test_a_second_start_uses_the_first_starts_cache_and_a_corrupt_part_stops_nothing(
        tmp_path: Path) -> None:
    volume = tmp_path
    first, _ = launch(volume)
    folder = first["models"][0]["compile_cache"].removeprefix("compile cache on the volume: ")
    assert folder.startswith(str(volume / "vllm-cache"))
    assert first["launch"]["timeline"][0]["compile_cache"] == "miss"
    compiled = kernels(volume)
    [artifact] = (volume / "vllm-cache").rglob("rank_0_0/model")
    assert len(compiled) >= 4, "the first start left its kernels on the volume"
    # What a worker killed while writing leaves: the compiled artifact cut in half, and
    # garbage in some kernels. The rest is intact.
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    garbage = sorted(compiled)[::2]
    for path in garbage:
        path.write_bytes(os.urandom(64))
    intact = {p: t for p, t in compiled.items() if p not in garbage}

    second, log = launch(volume)

    timeline = second["launch"]["timeline"][0]
    assert second["launch"]["healthy"]
    assert f"Compiling model again due to a load failure from {artifact}" in log
    assert timeline["compile_cache"] == "unloadable"
    assert {p: t for p, t in kernels(volume).items() if p in intact} == intact, \
        "every intact kernel came from the first start's cache, none was compiled again"
    assert all(timeline[phase] is not None for phase in
               ("weights_s", "compile_s", "kv_cache_tokens", "engine_init_s", "healthy_s"))
