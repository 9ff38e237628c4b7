"""What can be checked before vLLM is started, each check a verdict with its reason.

Used by test_vllm_command.py: vLLM's interpreter (or `vllm` executable) loads
vLLM, the GPUs seen against TENSOR_PARALLEL_SIZE, free disk (and write access
before a download) in HF_HOME, the weights' size against the memory vLLM may
take, the loopback ports are free. A check never raises: what cannot be
measured is reported as such.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_locator import weights_size
from worker.launch.plan import Launch, child_env
from worker.settings.loader import Settings
from worker.upstream.ports import taken

IMPORT_TIMEOUT = 300.0  # importing vLLM takes 10-60 s; a hung import is reported, not awaited
_IMPORT_VLLM = "import vllm; print('vllm-version=' + vllm.__version__)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str


def size(n: float) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n / 1024:.1f} KiB"


def check_vllm(settings: Settings, env: Mapping[str, str],
               timeout: float = IMPORT_TIMEOUT) -> Check:
    """Does the interpreter (or `vllm` executable) the command starts exist and load vLLM?"""
    if settings.use_vllm_serve:
        name, what, args = "vllm", "`vllm` (USE_VLLM_SERVE=true)", ["--version"]
    else:
        name, what = settings.vllm_python, f"VLLM_PYTHON={settings.vllm_python}"
        args = ["-c", _IMPORT_VLLM]
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        return Check("vllm", "fail", f"{what} is not an executable file or on PATH")
    what = what if found == name else f"{what} ({found})"
    try:
        done = subprocess.run([found, *args], env=dict(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("vllm", "warn", f"{what} did not finish loading vLLM in {timeout:g} s")
    lines = [line for line in f"{done.stdout}\n{done.stderr}".splitlines() if line.strip()]
    if done.returncode != 0:
        last = lines[-1] if lines else f"exit code {done.returncode}"
        return Check("vllm", "fail", f"{what} cannot load vLLM: {last}")
    versions = [line.split("=", 1)[1] for line in lines if line.startswith("vllm-version=")]
    return Check("vllm", "ok", f"{what} loads vLLM {(versions or lines or ['?'])[-1]}")


def check_gpus(gpus: int, settings: Settings) -> Check:
    """GPUs vLLM will see, and whether TENSOR_PARALLEL_SIZE can be met."""
    if gpus == 0:
        return Check("gpus", "warn", "0 GPUs visible: vLLM's CUDA build cannot start without "
                                     "one (only a CPU build of vLLM can)")
    wanted = settings.tensor_parallel_size
    if wanted and wanted > gpus:
        return Check("gpus", "fail", f"TENSOR_PARALLEL_SIZE={wanted} but {gpus} GPU(s) visible")
    return Check("gpus", "ok", f"{gpus} GPU(s) visible; vLLM uses {wanted or gpus}")


def gpu_memory(env: Mapping[str, str]) -> list[tuple[int, int]] | None:
    """(total, free) bytes of each visible GPU, from nvidia-smi; None without it."""
    tool = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    if tool is None:
        return None
    ids = env.get("CUDA_VISIBLE_DEVICES")
    command = [tool, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits",
               *([f"--id={ids}"] if ids else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        rows = [line.split(",") for line in done.stdout.splitlines() if line.strip()]
        return [(int(total) << 20, int(free) << 20) for total, free in rows]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def available_ram(meminfo: str) -> int | None:
    """MemAvailable from the text of /proc/meminfo, in bytes."""
    values = [int(line.split()[1]) * 1024 for line in meminfo.splitlines()
              if line.startswith("MemAvailable:")]
    return values[0] if values else None


def check_memory(weights: int | None, gpus: list[tuple[int, int]] | None, gpus_used: int,
                 utilization: float, ram: int | None) -> Check:
    """Do the weights fit in what vLLM may take: GPU_MEMORY_UTILIZATION of the GPUs it uses?"""
    if not weights:
        return Check("memory", "ok", "weights not on disk yet: their size is known once "
                                     "downloaded")
    if gpus:
        used = gpus[:max(gpus_used, 1)]
        budget = sum(total for total, _ in used) * utilization
        if busy := [i for i, (total, free) in enumerate(used) if free < total * utilization]:
            return Check("memory", "fail", f"GPU {busy[0]} has less free memory than "
                         f"GPU_MEMORY_UTILIZATION={utilization:g} of it: something else uses it")
        status = "fail" if weights > budget else "warn" if weights > 0.9 * budget else "ok"
        advice = "" if status == "ok" else (": little or no room is left for the KV cache (a "
                                            "larger GPU, more GPUs, or a smaller model)")
        return Check("memory", status, f"weights {size(weights)}; vLLM may use "
                                       f"{size(budget)} of {len(used)} GPU(s){advice}")
    ram_text = "" if ram is None else f"; {size(ram)} of RAM available"
    status = "warn" if ram is not None and weights > ram else "ok"
    return Check("memory", status, f"weights {size(weights)}; GPU memory unknown (no "
                                   f"nvidia-smi){ram_text}")


def check_disk(hf_home: str, needs_download: bool) -> Check:
    """Free space (and, before a download, write access) where the weights live or will."""
    place = Path(hf_home)
    while not place.exists() and place != place.parent:
        place = place.parent
    missing = "" if place == Path(hf_home) else " (HF_HOME does not exist: no network volume?)"
    free = f"{size(shutil.disk_usage(place).free)} free in {place}{missing}"
    if needs_download and not os.access(place, os.W_OK):
        return Check("disk", "fail", f"{free}, not writable: the weights cannot be downloaded")
    if needs_download:
        return Check("disk", "warn" if missing else "ok",
                     f"{free}; the worker downloads the weights there")
    return Check("disk", "ok", free)


def check_port(port: int) -> Check:
    """Can vLLM bind its loopback port (as uvicorn does, with SO_REUSEADDR)?"""
    if (why := taken(port)) is not None:
        return Check("port", "fail", why)
    return Check("port", "ok", f"127.0.0.1:{port} is free")


def run_checks(settings: Settings, env: Mapping[str, str], launches: Sequence[Launch],
               gpus: int) -> list[Check]:
    """Everything that can be checked without starting vLLM."""
    meminfo = Path("/proc/meminfo")
    ram = available_ram(meminfo.read_text()) if meminfo.exists() else None
    memory = gpu_memory(env) if gpus else None
    several = len(launches) > 1
    checks = [check_vllm(settings, child_env(env, settings)), check_gpus(gpus, settings),
              check_disk(settings.hf_home, not all(x.location.is_local for x in launches))]
    for launch in launches:
        local, where = launch.location.is_local, launch.location.model
        found = check_memory(weights_size(where) if local else None, memory,
                             settings.tensor_parallel_size or gpus,
                             launch.model.gpu_memory_utilization, ram)
        port = check_port(launch.model.port)
        for check in (found, port):
            name = f"{check.name} ({launch.model.served_name})" if several else check.name
            checks.append(Check(name, check.status, check.detail))
    if settings.vllm_api_key:
        checks.append(Check("api-key", "warn", "VLLM_EXTRA_ARGS sets --api-key: the worker "
                            "sends it on its own requests to vLLM; the Runpod API key already "
                            "guards the endpoint, so it only protects vLLM's loopback port"))
    return checks
