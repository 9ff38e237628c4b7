"""Find the model's weights on disk before vLLM starts.

Order, first hit wins (each place tried is recorded as a step for the log and
for `test_vllm_command.py`):

1. `MODEL_PATH`, used exactly: it must exist and hold `config.json`.
2. Folders under `HF_HOME` named after the model: `<name>`, `model-<name>` and
   `model-<family>` (the name without its size suffix, so `openai/gpt-oss-120b`
   also finds the original gpt-oss worker's `model-gpt-oss`), compared ignoring case.
3. The Hugging Face cache (`models--{org}--{name}/snapshots/{hash}`) in each hub
   folder: the snapshot `refs/main` names, else the newest complete one; with a
   revision (`MODEL_REVISION`/`REVISION`), only the snapshot of that branch, tag or
   commit (a commit may be given by its first 7 or more characters).
4. The hub name itself: the worker downloads it into the hub cache of `HF_HOME` before
   vLLM starts (worker/launch/weights.py).

A folder is served only when complete: `config.json` plus weights, and every
shard its safetensors index lists. GGUF is refused with a sentence saying so.
`locate` is pure apart from reading the file system: no network, no vLLM.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
GGUF_MESSAGE = (
    "GGUF weights are not supported by this worker (vLLM serves them only experimentally): "
    "use the model's original safetensors repository instead")
_SIZE_SUFFIX = re.compile(r"-\d+(\.\d+)?[bBmM]$")


class LocatorError(RuntimeError):
    """The model cannot be served from what was given; the message says why."""


@dataclass(frozen=True)
class Location:
    """Where the weights are: a local folder, or the hub name when nothing local was found."""

    model: str
    is_local: bool
    steps: tuple[str, ...] = field(default=())


def check_folder(path: Path) -> str | None:
    """Why `path` cannot be served (None when it can)."""
    if not path.is_dir():
        return "it is not a folder"
    names = os.listdir(path)
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not weights and any(n.endswith(".gguf") for n in names):
        return GGUF_MESSAGE
    if "config.json" not in names:
        return "it has no config.json"
    if not weights:
        return "it has no weight files (*.safetensors or *.bin)"
    missing = [w for w in weights if not (path / w).exists()]
    for index in (n for n in names if n.endswith(".index.json")):
        try:
            shards = set(json.loads((path / index).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return f"its {index} cannot be read"
        missing += sorted(s for s in shards if not (path / s).exists())
    if missing:
        return f"it is incomplete: {', '.join(missing[:3])} missing (download unfinished?)"
    return None


def weights_size(folder: str) -> int:
    """Bytes of the weight files in a model folder (cache symlinks followed)."""
    paths = [Path(folder, n) for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in paths if p.exists())


def _find_ignoring_case(parent: Path, names: list[str]) -> list[Path]:
    """Children of `parent` whose names equal one of `names` ignoring case, in `names` order."""
    try:
        children = os.listdir(parent)
    except OSError:
        return []
    by_lower: dict[str, str] = {}
    for child in sorted(children):
        by_lower.setdefault(child.lower(), child)
    return [parent / by_lower[n.lower()] for n in names if n.lower() in by_lower]


def _custom_folder_names(model_name: str) -> list[str]:
    last = model_name.rstrip("/").rsplit("/", 1)[-1]
    names = [last, f"model-{last}"]
    family = _SIZE_SUFFIX.sub("", last)
    if family != last:
        names.append(f"model-{family}")
    return names


def _snapshots(repo_dir: Path, repo_id: str, hub: Path, revision: str | None,
               marker: str = "config.json") -> list[Path]:
    """Candidate snapshots: the one refs/main names first, then the rest, newest first;
    with a revision, only its snapshot."""
    from huggingface_hub import try_to_load_from_cache  # only when a cache is searched

    if revision is not None:
        found = try_to_load_from_cache(repo_id, marker, cache_dir=hub, revision=revision)
        if isinstance(found, str):
            return [Path(found).parent]
        commits = repo_dir / "snapshots"
        by_prefix = sorted(commits.glob(f"{revision}*")) if len(revision) >= 7 else []
        return by_prefix[:1] if len(by_prefix) == 1 else []
    found = try_to_load_from_cache(repo_id, marker, cache_dir=hub)
    first = [Path(found).parent] if isinstance(found, str) else []
    try:
        others = sorted((p for p in (repo_dir / "snapshots").iterdir() if p not in first),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        others = []
    return first + others


def _repo_folder(repo_id: str) -> str:
    """The cache's folder name for a model repo (huggingface_hub's own rule), imported only
    when a cache is searched: the import costs a tenth of a second before vLLM starts."""
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo_id, repo_type="model")


def _from_cache(model_name: str, hub: Path, steps: list[str], revision: str | None
                ) -> Path | None:
    wanted = _repo_folder(model_name)
    matches = _find_ignoring_case(hub, [wanted])
    if not matches:
        steps.append(f"not in the cache {hub}: no {wanted}")
        return None
    repo_dir = matches[0]
    repo_id = repo_dir.name.removeprefix("models--").replace("--", "/")
    snapshots = _snapshots(repo_dir, repo_id, hub, revision)
    if not snapshots:
        what = f"no snapshot of revision {revision}" if revision else "it has no snapshots"
        steps.append(f"not in the cache {repo_dir}: {what}")
    return _first_servable(snapshots, steps, "the cache: ", "snapshot ")


def _first_servable(candidates: list[Path], steps: list[str], found_in: str = "",
                    kind: str = "") -> Path | None:
    """The first candidate folder that can be served, each one tried recorded as a step;
    GGUF weights end the search with LocatorError."""
    for folder in candidates:
        reason = check_folder(folder)
        if reason is None:
            steps.append(f"Found model in {found_in}{folder}")
            return folder
        if reason == GGUF_MESSAGE:
            raise LocatorError(f"{folder}: {GGUF_MESSAGE}.")
        steps.append(f"skipped {kind}{folder}: {reason}")
    return None


def find_in_caches(repo_id: str, hub_caches: tuple[str, ...], marker: str) -> Path | None:
    """A snapshot of `repo_id` that holds `marker` (an adapter's adapter_config.json) in
    the hub caches, as for models: the one refs/main names first, then the newest."""
    wanted = _repo_folder(repo_id)
    for hub in hub_caches:
        for repo_dir in _find_ignoring_case(Path(hub), [wanted]):
            for snapshot in _snapshots(repo_dir, repo_id, Path(hub), None, marker):
                if (snapshot / marker).is_file():
                    return snapshot
    return None


def locate(model_name: str, model_path: str | None, hf_home: str,
           hub_caches: tuple[str, ...], revision: str | None = None) -> Location:
    """Apply the search order in the module docstring; raise `LocatorError` for what cannot work."""
    steps: list[str] = []
    if model_path or model_name.startswith("/"):
        variable, value = ("MODEL_PATH", model_path) if model_path else ("MODEL_NAME", model_name)
        path = Path(value)
        if path.suffix.lower() == ".gguf":
            raise LocatorError(f"{variable}={value}: {GGUF_MESSAGE}.")
        if not path.exists():
            raise LocatorError(f"{variable}={value} does not exist.")
        reason = check_folder(path)
        if reason is not None:
            raise LocatorError(f"{variable}={value} cannot be served: {reason}.")
        steps.append(f"Found model in {variable}: {path}")
        return Location(str(path), True, tuple(steps))
    if model_name.lower().endswith((".gguf", "-gguf")):
        raise LocatorError(f"MODEL_NAME={model_name}: {GGUF_MESSAGE}.")
    names = _custom_folder_names(model_name)
    folders = _find_ignoring_case(Path(hf_home), names)
    if not folders:
        steps.append(f"not in {hf_home}: no folder named {', '.join(names)}")
    found = _first_servable(folders, steps)
    for hub in hub_caches:
        if found is not None:
            break
        found = _from_cache(model_name, Path(hub), steps, revision)
    if found is not None:
        return Location(str(found), True, tuple(steps))
    at = f" at revision {revision}" if revision else ""
    steps.append(f"not found on disk: {model_name}{at} is downloaded into {hf_home} first")
    return Location(model_name, False, tuple(steps))


def link_for_vllm(target: str, hf_home: str, served_name: str) -> str:
    """A stable path to give vLLM instead of a cache path it could mistake for a repo id.

    `{HF_HOME}/.links/{served name}` becomes a symlink to `target`: one link per
    model name, because a network volume is often shared by endpoints serving
    different models, and one shared `{HF_HOME}/model` link would be repointed
    under a vLLM still loading from it. When HF_HOME is read-only (or holds a
    real folder there) a private temp folder is used instead.
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", served_name).strip(".") or "model"
    link = Path(hf_home) / ".links" / name
    if link.resolve() == Path(target).resolve():
        return str(link) if link.is_symlink() else target
    if not (link.exists() and not link.is_symlink()):
        try:
            return _replace_symlink(link, target)
        except OSError:
            pass
    return _replace_symlink(Path(tempfile.mkdtemp(prefix="vllm-model-")) / name, target)


def _replace_symlink(link: Path, target: str) -> str:
    """Point `link` at `target` atomically, so a concurrent reader never sees it missing."""
    link.parent.mkdir(parents=True, exist_ok=True)
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    os.symlink(os.path.abspath(target), staging)
    os.replace(staging, link)
    return str(link)
