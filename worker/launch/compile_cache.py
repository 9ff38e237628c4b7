"""Where vLLM keeps its compile cache: on the network volume, so a new worker reuses it.

vLLM caches its torch.compile artifacts under `VLLM_CACHE_ROOT` (default
`~/.cache/vllm`, on the container disk: new for every worker). The worker points it at
`<HF_HOME's parent>/vllm-cache/<model>-<digest>` (so `/runpod-volume/vllm-cache/...`
with the default `HF_HOME`), unless `VLLM_CACHE_ROOT` is set or
`COMPILE_CACHE_ON_VOLUME=false`, and only when that folder can be created and written
(else vLLM's default, with a line saying why).

Never the wrong cache: vLLM names each cache entry by a hash of its version, the model
config (the model's path, dtype, context length, quantization, ...), the engine's cache,
parallel and scheduler configs, the compile-affecting `VLLM_*` variables, torch's version
and inductor config and the system it runs on (the GPU, CUDA and Triton versions), and
checks the traced source files on load. One volume can therefore serve endpoints of
other models, vLLM versions and GPU types side by side. The worker adds one more folder
level, by model name and a digest of its `config.json`, because the path vLLM sees
(`HF_HOME/.links/<name>`) stays the same when new weights replace old ones. A corrupt or
half-written entry does not stop vLLM: it logs "Compiling model again due to a load
failure" and compiles anew.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path


def cache_folder(hf_home: str, served_name: str, model_folder: str | None) -> Path:
    """The volume's cache folder for one model (pure)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", served_name).strip(".-") or "model"
    try:
        identity = (Path(model_folder) / "config.json").read_bytes() if model_folder else b""
    except OSError:
        identity = b""
    digest = hashlib.sha256(identity or served_name.encode()).hexdigest()[:12]
    return Path(hf_home).parent / "vllm-cache" / f"{slug}-{digest}"


def writable(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache (None when it can): made if missing, then a
    file written and removed in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def choose(env: dict[str, str], on_volume: bool, hf_home: str, served_name: str,
           model_folder: str | None) -> tuple[str | None, str]:
    """The VLLM_CACHE_ROOT to give vLLM (None: leave it as it is) and why."""
    if env.get("VLLM_CACHE_ROOT"):
        return None, f"compile cache in {env['VLLM_CACHE_ROOT']} (VLLM_CACHE_ROOT)"
    default = os.path.expanduser("~/.cache/vllm")
    if not on_volume:
        return None, f"compile cache in vLLM's default {default} (COMPILE_CACHE_ON_VOLUME=false)"
    folder = cache_folder(hf_home, served_name, model_folder)
    if (why := writable(folder)) is not None:
        return None, (f"compile cache in vLLM's default {default}: {folder} cannot be "
                      f"written ({why})")
    return str(folder), f"compile cache on the volume: {folder}"
