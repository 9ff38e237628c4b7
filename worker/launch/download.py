"""The worker's own download of a model that is not on disk, before vLLM starts.

Left to itself, vLLM downloads a hub name silently, with every file of its weight format
(`original/` copies too). Here the worker fetches what vLLM will load, no more: the weight
files of the format vLLM's default loader picks (`select_files`) and the small files vLLM and
transformers read, into the hub cache, then starts vLLM on the snapshot folder as on any
model found on disk. First the plan (`plan_download`: files, sizes, what the cache holds) and
a free-space check; then one download per repo and revision at a time on a shared volume (a
file lock in the cache: the second worker says it waits, then finds the files), resumable
files and a log line every few seconds (download_transfer.py). Every failure is a
`DownloadError`: one sentence naming the setting to change. Nothing here reads the
environment: the caller passes HF_TOKEN, MODEL_REVISION, HF_HUB_OFFLINE, LOAD_FORMAT.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import cast
from urllib.parse import quote

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from model_locator import GGUF_MESSAGE, check_folder
from worker.launch import download_transfer as transfer
from worker.launch.download_transfer import DownloadError, PlannedFile, human_bytes

__all__ = ["DownloadError", "DownloadPlan", "DownloadResult", "PlannedFile", "download_model",
           "plan_download", "select_files"]
API_TIMEOUT = 30.0
# vLLM 0.32's DefaultModelLoader._prepare_weights: per load format, the patterns tried in
# order (top-level files only); the first that matches a file is the one loaded.
WEIGHT_PATTERNS = {
    "hf": ("*.safetensors", "*.bin", "*.pt"), "bitsandbytes": ("*.safetensors", "*.bin", "*.pt"),
    "safetensors": ("*.safetensors",), "fastsafetensors": ("*.safetensors",),
    "instanttensor": ("*.safetensors",), "runai_streamer": ("*.safetensors",),
    "mistral": ("consolidated*.safetensors",), "pt": ("*.pt",), "npcache": ("*.bin", "*.pt"),
    "dummy": (),
}
INDEXES = {"*.safetensors": "model.safetensors.index.json", "*.bin": "pytorch_model.bin.index.json",
           "consolidated*.safetensors": "consolidated.safetensors.index.json"}
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
SMALL_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".py", ".vocab")
_ST_MODULE = re.compile(r"^\d+_[^/]+/[^/]+$")  # a sentence-transformers module's file
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class DownloadPlan:
    """What a download would fetch, before it starts (the diagnostic shows it)."""

    repo_id: str
    revision: str
    commit: str
    cache_dir: str
    weights: str  # which weight files vLLM will load, and why
    files: tuple[PlannedFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def present_bytes(self) -> int:
        return sum(f.size if f.present else f.partial for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return self.total_bytes - self.present_bytes

    def describe(self) -> list[str]:
        """A summary line, then each file with its size and whether it is in the cache."""
        return [f"{self.repo_id} at {self.commit[:12]} ({self.revision}): {len(self.files)} files, "
                f"{human_bytes(self.total_bytes)}, {human_bytes(self.present_bytes)} in the cache "
                f"{self.cache_dir}, {human_bytes(self.missing_bytes)} to download; {self.weights}",
                *(f"  {f.name}: {human_bytes(f.size)}, " + ("in the cache" if f.present else
                  f"{human_bytes(f.partial)} there, resumed" if f.partial else "to download")
                  for f in self.files)]


@dataclass(frozen=True)
class DownloadResult:
    path: str  # the snapshot folder to start vLLM on
    commit: str
    files: int
    bytes_downloaded: int
    bytes_present: int  # already in the cache: whole files and the resumed parts of others
    seconds: float  # the download itself, after any wait for another worker
    waited: float = 0.0  # seconds spent waiting for another worker's download of it

    @property
    def rate(self) -> float:
        return self.bytes_downloaded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """For the start-up timeline: `downloaded 65.2 GB in 4 m 10 s, 261 MB/s`."""
        return "downloaded" + transfer.final_line("", self.bytes_downloaded, self.seconds,
                                         self.bytes_present).split(":", 1)[1]


def weight_choice(names: Collection[str], load_format: str) -> tuple[list[str], str | None, str]:
    """The weight files vLLM loads, the index that filters them (None: all), and the pattern."""
    top = [n for n in names if "/" not in n]
    chosen = load_format.lower()
    if chosen == "auto":  # vLLM: the official Mistral format when the repo has it
        chosen = "mistral" if any(fnmatch(n, "consolidated*.safetensors") for n in top) else "hf"
    if chosen not in WEIGHT_PATTERNS:
        raise DownloadError(f"LOAD_FORMAT {load_format} names files the worker cannot tell: set "
                            "LOAD_FORMAT to auto, safetensors or pt, or put the model on the "
                            "volume yourself", True)
    for pattern in WEIGHT_PATTERNS[chosen]:
        found = sorted(n for n in top if fnmatch(n, pattern) and n not in NOT_WEIGHTS)
        if found:  # the index: vLLM keeps the safetensors it names; others load all
            index = INDEXES.get(pattern)
            return found, index if index in top else None, pattern
    return [], None, ""


def select_files(names: Collection[str], load_format: str, shards: Collection[str] | None,
                 repo_id: str) -> tuple[list[str], str]:
    """The files of the repo vLLM reads, and a sentence on the weights: the shards the index
    names (`shards`), else every file of the chosen pattern, plus the small files."""
    weights, index, pattern = weight_choice(names, load_format)
    if index is not None and shards is not None and pattern.endswith(".safetensors"):
        if missing := sorted(set(shards) - set(names)):
            raise DownloadError(f"{repo_id}'s {index} names weight files the repo does not have "
                                f"({', '.join(missing[:3])}): set MODEL_REVISION to a complete "
                                "revision", True)
        weights = [w for w in weights if w in shards]
    if not weights and load_format != "dummy":
        if load_format.lower() in ("auto", "hf") and any(n.endswith(".gguf") for n in names):
            raise DownloadError(f"{repo_id}: {GGUF_MESSAGE}", True)
        raise DownloadError(f"{repo_id} has no weight files vLLM loads with LOAD_FORMAT "
                            f"{load_format} (top-level *.safetensors, *.bin or *.pt): check "
                            "MODEL_NAME", True)
    if "config.json" not in names:
        raise DownloadError(f"{repo_id} has no config.json: the worker serves models in the "
                            "Hugging Face layout, check MODEL_NAME", True)
    small = [n for n in names if _small(n, index)]
    for folder in sorted({n.split("/")[0] for n in names if _ST_MODULE.match(n)}):
        small += [w for w in (f"{folder}/model.safetensors", f"{folder}/pytorch_model.bin")
                  if w in names][:1]
    reason = (f"weights: {len(weights)} {pattern} files"
              + (f" named by {index}" if index and shards is not None and "safe" in index else "")
              + f" (LOAD_FORMAT {load_format})")
    return sorted(set(weights) | set(small)), reason


def _small(name: str, index: str | None) -> bool:
    """A file vLLM or transformers may read besides the weights (not another format's index)."""
    if name.endswith(".index.json"):
        return name == index
    if "/" not in name:
        return name.endswith(SMALL_SUFFIXES) or name.startswith("tokenizer.model")
    if name.startswith("additional_chat_templates/"):
        return name.endswith(".jinja")
    return bool(_ST_MODULE.match(name)) and name.endswith(".json")


def plan_download(repo_id: str, *, cache_dir: str, revision: str | None = None,
                  token: str | None = None, offline: bool = False, load_format: str = "auto",
                  endpoint: str | None = None) -> DownloadPlan:
    """Which files a download fetches, their sizes, and what the cache holds already.

    Asks the Hub for the revision's commit and file list and reads the weights index
    (fetching that one small file into the cache); offline, describes the cached snapshot."""
    revision, token = revision or "main", token or None
    cache = transfer.Cache(repo_id, cache_dir)
    if offline:
        folder = _offline_snapshot(cache, revision)
        files = tuple(PlannedFile(p.relative_to(folder).as_posix(), p.stat().st_size, "",
                                  present=True) for p in sorted(folder.rglob("*")) if p.is_file())
        return DownloadPlan(repo_id, revision, folder.name, cache_dir, "offline: the cached "
                            "snapshot", files)
    verdicts = _Verdicts(repo_id, revision, cache_dir, token, endpoint)
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo_id, revision=revision, timeout=API_TIMEOUT)
        commit = cast(str, info.sha)
        tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                if isinstance(f, RepoFile)}
        if info.gated:  # its listing is public: ask for a file to learn whether we may read it
            get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=commit,
                                            endpoint=endpoint), token=token or False,
                                 timeout=API_TIMEOUT, endpoint=endpoint)
        _, index, pattern = weight_choice(tree, load_format)
        shards = None
        if index is not None and pattern.endswith(".safetensors"):
            path = hf_hub_download(repo_id, index, revision=commit, cache_dir=cache_dir,
                                   token=token or False, endpoint=endpoint,
                                   tqdm_class=transfer.Progress(repo_id, 0, transfer.LOG).bar())
            shards = set(json.loads(Path(path).read_text()).get("weight_map", {}).values())
    except Exception as error:
        raise verdicts.of(error) from error
    names, weights = select_files(tree, load_format, shards, repo_id)
    files = tuple(cache.state(_planned(tree[name])) for name in names)
    return DownloadPlan(repo_id, revision, commit, cache_dir, weights, files)


def download_model(repo_id: str, *, cache_dir: str, revision: str | None = None,
                   token: str | None = None, offline: bool = False, load_format: str = "auto",
                   endpoint: str | None = None, progress_interval: float = 5.0,
                   logger: logging.Logger | None = None, max_workers: int = 8,
                   use_xet: bool = True,
                   free_space: Callable[[str], int] | None = None) -> DownloadResult:
    """What vLLM will load of `repo_id`, downloaded into the hub cache `cache_dir` unless it
    is there; `path` of the result is the snapshot folder. Raises DownloadError.

    `use_xet` False fetches Xet-backed files over plain HTTP too (resumable, slower);
    `free_space` (bytes free under a folder) is for tests."""
    log = logger or transfer.LOG
    revision, token = revision or "main", token or None
    cache = transfer.Cache(repo_id, cache_dir)
    if offline:
        folder = _offline_snapshot(cache, revision)
        return DownloadResult(str(folder), folder.name, 0, 0, 0, 0.0)
    plan = plan_download(repo_id, cache_dir=cache_dir, revision=revision, token=token,
                         load_format=load_format, endpoint=endpoint)
    verdicts = _Verdicts(repo_id, revision, cache_dir, token, endpoint)
    xet = use_xet and transfer.xet_available()
    source = transfer.Source(repo_id, plan.commit, token, endpoint, xet)
    try:
        with _RepoLock(cache, revision, log) as lock:
            plan = replace(plan, files=tuple(cache.state(f) for f in plan.files))  # now
            _check_space(plan, free_space or (lambda path: shutil.disk_usage(path).free))
            started = time.monotonic()
            missing = [f for f in plan.files if not f.present]
            if missing:
                log.info("Downloading %s: %d files, %s (%s of it already in the cache %s)",
                         repo_id, len(missing), human_bytes(plan.missing_bytes),
                         human_bytes(plan.present_bytes), cache_dir)
            with transfer.Progress(repo_id, plan.missing_bytes, log, progress_interval) as progress:
                transfer.fetch_all(source, cache, missing, progress, max_workers)
            for f in plan.files:
                cache.link(plan.commit, f)
            cache.write_ref(revision, plan.commit)
            seconds = time.monotonic() - started
    except Exception as error:
        raise verdicts.of(error) from error
    folder = cache.storage / "snapshots" / plan.commit
    present = plan.total_bytes - progress.done
    if missing:
        log.info(transfer.final_line(repo_id, progress.done, seconds, present))
    else:
        log.info("%s: all %d files (%s) are in the cache %s", repo_id, len(plan.files),
                 human_bytes(plan.total_bytes), folder)
    return DownloadResult(str(folder), plan.commit, len(plan.files), progress.done, present,
                          seconds, lock.waited)


def _planned(entry: RepoFile) -> PlannedFile:
    etag = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
    return PlannedFile(entry.path, entry.size, etag, xet=entry.xet_hash is not None)


def _offline_snapshot(cache: transfer.Cache, revision: str) -> Path:
    ref = cache.storage / "refs" / revision
    commit = ref.read_text().strip() if not _COMMIT.fullmatch(revision) and ref.is_file() else ""
    folder = cache.storage / "snapshots" / (commit or revision)
    if (reason := check_folder(folder)) is not None:
        raise DownloadError(f"{cache.repo_id} (revision {revision}) is not complete in the cache "
                            f"{cache.cache_dir} ({reason}) and HF_HUB_OFFLINE is set, so it cannot "
                            "be downloaded: unset HF_HUB_OFFLINE, or put the model on the volume "
                            "first", True)
    return folder


class _RepoLock:
    """One download per repo and revision in a cache; says so while it waits for another."""

    def __init__(self, cache: transfer.Cache, revision: str, log: logging.Logger) -> None:
        self.path = cache.lock(f"worker-download-{quote(revision, safe='')}")
        self.lock = FileLock(self.path)
        self.cache, self.log, self.waited = cache, log, 0.0

    def __enter__(self) -> _RepoLock:
        started = time.monotonic()
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            self.log.info("Waiting for another worker downloading %s into %s (lock %s)",
                          self.cache.repo_id, self.cache.cache_dir, self.path)
            while True:
                try:
                    self.lock.acquire(timeout=60)
                    break
                except Timeout:
                    self.log.info("Still waiting for the other download of %s (%.0f s so far)",
                                  self.cache.repo_id, time.monotonic() - started)
            self.waited = time.monotonic() - started
            self.log.info("The other download of %s ended after %.1f s", self.cache.repo_id,
                          self.waited)
        return self

    def __exit__(self, *args: object) -> None:
        self.lock.release()


def _check_space(plan: DownloadPlan, free_space: Callable[[str], int]) -> None:
    os.makedirs(plan.cache_dir, exist_ok=True)
    if (needed := plan.missing_bytes) > (free := free_space(plan.cache_dir)):
        raise DownloadError(f"Not enough disk space for {plan.repo_id}: {human_bytes(needed)} to "
                            f"download, {human_bytes(free)} free in {plan.cache_dir}: give the "
                            "network volume more room (or free some), or set HF_HOME to a "
                            "larger disk", True)


@dataclass(frozen=True)
class _Verdicts:
    """huggingface_hub's errors as DownloadErrors a user understands (others unchanged)."""

    repo_id: str
    revision: str
    cache_dir: str
    token: str | None
    endpoint: str | None

    def of(self, error: BaseException) -> BaseException:
        repo, hub = self.repo_id, self.endpoint or "https://huggingface.co"
        if isinstance(error, DownloadError):
            return error
        if isinstance(error, GatedRepoError):
            return DownloadError((f"{repo} is gated: accept its terms on {hub}/{repo} and set"
                                  if self.token is None else f"HF_TOKEN's account has no access "
                                  f"to the gated {repo}: accept its terms on {hub}/{repo} with "
                                  "that account, or set") + " HF_TOKEN to a token of an account "
                                 "that has access", True)
        if isinstance(error, RevisionNotFoundError):
            return DownloadError(f"Revision {self.revision} of {repo} does not exist: set "
                                 "MODEL_REVISION to a branch, tag or commit of it", True)
        if isinstance(error, RepositoryNotFoundError):
            return DownloadError(f"{repo} does not exist on {hub} or is private: check MODEL_NAME"
                                 + (" (for a private repo, set HF_TOKEN)" if self.token is None
                                    else " and that HF_TOKEN's account can read it"), True)
        if isinstance(error, DisabledRepoError):
            return DownloadError(f"{repo} is disabled on {hub}: set MODEL_NAME to another", True)
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            status = error.response.status_code
            said = error.response.headers.get("X-Error-Message") or _first_line(error)
            if status in (401, 403):
                return DownloadError(f"{hub} refused HF_TOKEN for {repo} ({status}: {said}): set "
                                     "HF_TOKEN to a valid token with read access", True)
            return DownloadError(f"{hub} answered {status} while {repo} was being downloaded "
                                 f"({said}): the Hub is busy or down, transient, a restart "
                                 "retries", False)
        if isinstance(error, OfflineModeIsEnabled):
            return DownloadError(f"HF_HUB_OFFLINE is set, so {repo} cannot be downloaded and it "
                                 f"is not complete in {self.cache_dir}: unset HF_HUB_OFFLINE or "
                                 "put the model on the volume first", True)
        if isinstance(error, httpx2.TransportError | ConnectionError | TimeoutError):
            return DownloadError(f"Cannot reach {hub} to download {repo} ({type(error).__name__}"
                                 f": {_first_line(error)}) and it is not complete in "
                                 f"{self.cache_dir}: check the worker's network; transient, a "
                                 "restart retries", False)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DownloadError(f"The disk is full: {self.cache_dir} ran out of space while "
                                 f"{repo} was being downloaded: give the network volume more "
                                 "room (or free some), or set HF_HOME to a larger disk", True)
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return DownloadError(f"Cannot write {repo} into {self.cache_dir} ({error.strerror}):"
                                 " set HF_HOME to a writable folder", True)
        return error


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
