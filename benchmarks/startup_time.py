"""Scenario 4, start-up: what the worker adds to the time before the first job, and the locator.

Worker: `python handler.py` is launched as the platform launches it, against the job
API stand-in (fakes.platform), with the stand-in vLLM (fakes.vllm) as its vLLM child
(through a VLLM_PYTHON launcher, so the real settings, locator, command builder and
supervisor run) and a fabricated model folder. The stand-in listens only `healthy_after`
seconds after binding its port and reports when it started and when it listened. Then:

- worker total: from launching the worker to the SDK's first job-take request;
- upstream's own: from the stand-in's process start to its listening;
- overhead = total - upstream's own, split into before the spawn (interpreter, imports,
  settings, locating) and after health (noticing it, importing and starting the SDK).

The interpreter's start and the imports are timed separately, in fresh processes.

Locator: `model_locator.locate` over a fabricated Hugging Face cache of `models`
models (config.json, a weights file, refs/main each), for a model in the middle of the
cache and for one that is not there (every place searched; vLLM would download it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Background, ms, percentile
from benchmarks.processes import PROJECT, Process, base_env
from fakes.platform import Platform
from fakes.vllm import free_port, write_launcher


def fabricate_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


async def launch_once(work: Path, healthy_after: float, index: int) -> dict[str, float]:
    api = Platform(ping_interval=10).start()
    report = work / f"upstream-{index}.json"
    env = base_env(
        MODEL_PATH=str(fabricate_model(work / "bench-model")), VLLM_PYTHON=write_launcher(work),
        VLLM_PORT=str(free_port()), HF_HOME=str(work / "hf-home"), VLLM_STARTUP_TIMEOUT="60",
        FAKE_VLLM_HEALTHY_AFTER=str(healthy_after), FAKE_VLLM_REPORT=str(report),
        **api.env())
    worker = Process([sys.executable, "handler.py"], work / f"worker-{index}.log", env)
    try:
        worker.start()
        deadline = time.monotonic() + healthy_after + 60
        while api.first_take is None:
            if worker.proc is not None and worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.proc.returncode}):\n"
                                   f"{worker.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no job-take within {healthy_after + 60:g} s:\n"
                                   f"{worker.tail()}")
            await asyncio.sleep(0.005)
    finally:
        worker.stop()
        api.stop()
        upstream = json.loads(report.read_text()) if report.exists() else {}
        stop_leftover(upstream.get("pid"))
    total = api.first_take - worker.launched
    own = upstream["listening"] - upstream["started"]
    return {"total": total, "upstream_own": own, "overhead": total - own,
            "before_spawn": upstream["started"] - worker.launched,
            "after_healthy": api.first_take - upstream["listening"]}


def stop_leftover(pid: int | None) -> None:
    """The worker stops its vLLM itself; should it have failed to, end the stand-in here."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            ours = b"fakes.vllm" in cmdline.read()
    except OSError:
        return
    if ours:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def import_time(statement: str, runs: int) -> float:
    """Median wall time of a fresh interpreter running `statement`, in seconds."""
    taken = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], cwd=PROJECT, check=True,
                       env=base_env())
        taken.append(time.perf_counter() - started)
    return statistics.median(taken)


def fabricate_cache(hub: Path, models: int) -> None:
    for number in range(models):
        repo = hub / f"models--bench-org--model-{number:04d}"
        revision = f"{number:040x}"
        fabricate_model(repo / "snapshots" / revision)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)


def time_locate(name: str, hf_home: Path, runs: int) -> tuple[list[float], Any]:
    from model_locator import locate

    taken, found = [], None
    for _ in range(runs):
        started = time.perf_counter()
        found = locate(name, None, str(hf_home), (str(hf_home / "hub"),))
        taken.append(time.perf_counter() - started)
    return taken, found


async def scenario(work: Path, healthy_after: float, launches: int, models: int,
                   locate_runs: int) -> dict[str, Any]:
    background = Background().start()
    runs = [await launch_once(work, healthy_after, i) for i in range(launches)]
    launch_background = background.cores()
    bare = import_time("pass", 3)
    imports = {
        "interpreter_s": round(bare, 3),
        "import_handler_s": round(import_time("import handler", 3) - bare, 3),
        "import_runpod_s": round(import_time("import runpod", 3) - bare, 3),
    }
    hf_home = work / "locator-hf-home"
    fabricate_cache(hf_home / "hub", models)
    middle = f"bench-org/model-{models // 2:04d}"
    hit, where = time_locate(middle, hf_home, locate_runs)
    miss, missing = time_locate("bench-org/not-cached", hf_home, locate_runs)
    if not where.is_local or missing.is_local:
        raise RuntimeError(f"the locator answered {where} and {missing}")

    def summary(key: str) -> dict[str, float]:
        values = [run[key] for run in runs]
        return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3)}

    return {
        "healthy_after_s": healthy_after, "launches": launches,
        "worker_total": summary("total"), "upstream_own": summary("upstream_own"),
        "overhead": summary("overhead"), "before_spawn": summary("before_spawn"),
        "after_healthy": summary("after_healthy"), "imports": imports,
        "background_cores": launch_background,
        "locator": {"models": models, "runs": locate_runs,
                    "found_p50_ms": ms(percentile(hit, 0.5)), "found_max_ms": ms(max(hit)),
                    "missing_p50_ms": ms(percentile(miss, 0.5)),
                    "missing_max_ms": ms(max(miss))},
    }
