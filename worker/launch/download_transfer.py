"""Moving a model's bytes into the hub cache, and saying how it goes in Runpod's log view.

Runpod shows a worker's output as log lines, where a terminal progress bar is noise: one
line every few seconds says the bytes done, the rate over the last half minute (a rate since
the start would hide a stall) and the time left. The bytes come from the progress objects
huggingface_hub updates as it writes each chunk (its `tqdm_class` hook, one per file, from
several threads at once), so they are what reached the disk.

huggingface_hub 2.4 writes each download to a process-unique `<etag>.<id>.incomplete` and
never resumes one across processes; a killed worker's half file would be fetched again
from zero. So a file served over plain HTTP is fetched here with its `http_get` (retries,
Range resumption, size check) into `blobs/<etag>.incomplete`, a name the next worker finds
and resumes (adopting huggingface_hub's own half files too), under the lock huggingface_hub
takes for that blob, and checked against its sha256 when it was resumed. A Xet-backed file
(hf_xet installed) goes through `hf_hub_download`: faster, but restarted from zero.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock
from huggingface_hub import constants, hf_hub_download, hf_hub_url
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import build_hf_headers

from model_locator import LocatorError

RATE_WINDOW = 30.0  # seconds of samples the rate is measured over
_SHA256 = re.compile(r"[0-9a-f]{64}")
LOG = logging.getLogger("worker.launch.download")


class DownloadError(LocatorError):
    """Why the model cannot be downloaded, in one sentence; `permanent`: a restart cannot fix
    it. A LocatorError: the worker found no weights it can serve, either way."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Cancelled(Exception):
    """Raised from a bar's update to stop a download thread (another one failed)."""


def human_bytes(count: float) -> str:
    """Decimal units, as the Hub and huggingface_hub show sizes: 12.4 GB, 261 MB, 512 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def human_rate(per_second: float) -> str:
    """261 MB/s: whole units from 100 on, one decimal below."""
    number, unit = human_bytes(per_second).split(" ")
    return f"{float(number):.0f} {unit}/s" if float(number) >= 100 else f"{number} {unit}/s"


def human_duration(seconds: float) -> str:
    """1.4 s, 42 s, 3 m 22 s, 1 h 05 m."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} m {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} m"


def progress_line(repo_id: str, done: int, total: int, rate: float) -> str:
    """`Downloading org/model: 12.4 GB of 65.2 GB (19%), 261 MB/s, 3 m 22 s left`."""
    percent = int(100 * done / total) if total else 100
    left = (f"{human_duration((total - done) / rate)} left" if rate > 0
            else "time left unknown")
    return (f"Downloading {repo_id}: {human_bytes(done)} of {human_bytes(total)} ({percent}%), "
            f"{human_rate(rate)}, {left}")


def final_line(repo_id: str, downloaded: int, seconds: float, present: int) -> str:
    """`Downloaded org/model: 65.2 GB in 4 m 10 s, 261 MB/s (3.1 GB were already in the cache)`."""
    rate = downloaded / seconds if seconds > 0 else 0.0
    line = (f"Downloaded {repo_id}: {human_bytes(downloaded)} in {human_duration(seconds)}, "
            f"{human_rate(rate)}")
    if present:
        line += f" ({human_bytes(present)} were already in the cache)"
    return line


class Progress:
    """The bytes written by every download thread, logged every `interval` seconds."""

    def __init__(self, repo_id: str, total: int, logger: logging.Logger, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repo_id, self.total, self.logger = repo_id, total, logger
        self.interval, self.clock = interval, clock
        self.done = 0
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._samples: deque[tuple[float, int]] = deque()
        self._thread: threading.Thread | None = None
        self.started = clock()

    def add(self, count: int) -> None:
        if self.cancelled.is_set():
            raise Cancelled
        with self._lock:
            self.done += count

    def skip(self, count: int) -> None:
        """Bytes that turned out to need no download (another process wrote them)."""
        with self._lock:
            self.total -= count

    def rate(self) -> float:
        """Bytes per second over the last RATE_WINDOW seconds (since the start before that)."""
        now = self.clock()
        with self._lock:
            if not self._samples:
                self._samples.append((self.started, 0))
            self._samples.append((now, self.done))
            while now - self._samples[1][0] >= RATE_WINDOW:
                self._samples.popleft()
            first_time, first_done = self._samples[0]
        elapsed = now - first_time
        return (self.done - first_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        with self._lock:
            done, total = self.done, self.total
        return progress_line(self.repo_id, min(done, total), total, rate)

    def bar(self) -> type:
        """A class to hand huggingface_hub as `tqdm_class`: it counts, never draws.

        It has `update_transfer` so that a Xet download routes its network bytes there (and
        they are not counted twice): only the bytes written to the file count."""
        progress = self

        class Bar:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.n = kwargs.get("initial", 0) or 0
                self.total = kwargs.get("total")

            def update(self, n: float | None = 1) -> None:
                self.n += int(n or 0)
                progress.add(int(n or 0))

            def update_transfer(self, n: float | None = 1) -> None:
                if progress.cancelled.is_set():
                    raise Cancelled

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

            set_transfer_postfix_str = set_postfix_str
            set_description = set_description_str = refresh = set_postfix_str

            def close(self) -> None:
                pass

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *args: object) -> None:
                pass

        return Bar

    def __enter__(self) -> Progress:
        self.started = self.clock()
        self._thread = threading.Thread(target=self._report, name="download-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _report(self) -> None:
        while not self._stop.wait(self.interval):  # a timer: one line per interval
            self.logger.info(self.line())


@dataclass(frozen=True)
class PlannedFile:
    name: str
    size: int
    etag: str  # its blob's name in the cache: the sha256 of an LFS file, else its git blob id
    xet: bool = False
    present: bool = False  # complete in the cache
    partial: int = 0  # bytes of an interrupted download, to resume


@dataclass(frozen=True)
class Cache:
    """One repo in one hub cache: where its blobs, snapshots, refs and locks are."""

    repo_id: str
    cache_dir: str

    @property
    def storage(self) -> Path:
        return Path(self.cache_dir, repo_folder_name(repo_id=self.repo_id, repo_type="model"))

    def blob(self, etag: str) -> Path:
        return self.storage / "blobs" / etag

    def lock(self, name: str) -> Path:
        """`.locks/<repo folder>/<name>.lock`: huggingface_hub's own place (name: a blob's etag)."""
        path = Path(self.cache_dir, ".locks", self.storage.name, f"{name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def state(self, file: PlannedFile) -> PlannedFile:
        """The file as the cache holds it now: complete, partly downloaded, or absent."""
        blob = self.blob(file.etag)
        if blob.is_file() and blob.stat().st_size == file.size:
            return replace(file, present=True, partial=0)
        partial = max((p.stat().st_size for p in _partials(blob)), default=0)
        return replace(file, present=False, partial=min(partial, file.size))

    def link(self, commit: str, file: PlannedFile) -> None:
        """The snapshot's entry for the file: a relative symlink to its blob, as hf makes it."""
        pointer = self.storage / "snapshots" / commit / file.name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.blob(file.etag), pointer.parent)
        if pointer.is_symlink() and os.readlink(pointer) == target:
            return
        temporary = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, pointer)

    def write_ref(self, revision: str, commit: str) -> None:
        """`refs/<revision>` names the commit, so a later offline start finds the snapshot."""
        ref = self.storage / "refs" / revision
        if revision == commit or (ref.is_file() and ref.read_text() == commit):
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        temporary.write_text(commit)
        os.replace(temporary, ref)


@dataclass(frozen=True)
class Source:
    """Where the files come from: the repo at one commit, on which Hub, with which token."""

    repo_id: str
    commit: str
    token: str | None
    endpoint: str | None
    xet: bool  # Xet-backed files through hf_xet (else every file over HTTP, resumable)


def xet_available() -> bool:
    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def fetch_all(source: Source, cache: Cache, files: list[PlannedFile], progress: Progress,
              max_workers: int) -> None:
    """Every file on a pool of threads, largest first; the first failure stops the others."""
    if not files:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers, "download") as pool:
        futures = [pool.submit(fetch, source, cache, f, progress)
                   for f in sorted(files, key=lambda f: -f.size)]
        done, _ = concurrent.futures.wait(futures, return_when="FIRST_EXCEPTION")
        if any(f.exception() is not None for f in done):
            progress.cancelled.set()
            for future in futures:
                future.cancel()
    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])


def fetch(source: Source, cache: Cache, file: PlannedFile, progress: Progress) -> None:
    """One file into its blob (not yet linked into the snapshot)."""
    blob = cache.blob(file.etag)
    blob.parent.mkdir(parents=True, exist_ok=True)
    by_xet = file.xet and source.xet
    with FileLock(cache.lock(file.etag)):  # the lock huggingface_hub takes for this blob
        if blob.is_file() and blob.stat().st_size == file.size:
            progress.skip(file.size - file.partial)  # another process finished it
            return
        partial = _adopt_partial(blob, keep=not by_xet)
        if not by_xet:
            _fetch_over_http(source, file, partial, progress)
            os.replace(partial, blob)
            return
    hf_hub_download(source.repo_id, file.name, revision=source.commit, cache_dir=cache.cache_dir,
                    token=source.token or False, endpoint=source.endpoint,
                    tqdm_class=progress.bar())  # takes the blob's lock itself


def _fetch_over_http(source: Source, file: PlannedFile, partial: Path, progress: Progress) -> None:
    url = hf_hub_url(source.repo_id, file.name, revision=source.commit, endpoint=source.endpoint)
    headers = build_hf_headers(token=source.token or False)
    while True:  # twice at most: a whole download is not checked again
        resumed = partial.stat().st_size if partial.exists() else 0
        with partial.open("ab") as out:
            http_get(url, out, resume_size=resumed, headers=headers, expected_size=file.size,
                     displayed_filename=file.name, tqdm_class=progress.bar())
        size = partial.stat().st_size
        if size != file.size:
            raise DownloadError(f"{file.name} of {source.repo_id} arrived with {size} bytes "
                                f"instead of {file.size}: a restart downloads it again", False)
        if not resumed or not _SHA256.fullmatch(file.etag) or _sha256(partial) == file.etag:
            return
        LOG.warning("The resumed %s of %s does not match its sha256: downloading it whole",
                    file.name, source.repo_id)
        progress.skip(-resumed)  # the resumed bytes are to be downloaded after all
        partial.unlink()


def _partials(blob: Path) -> list[Path]:
    """Interrupted downloads of this blob: ours, and huggingface_hub's `<etag>.<id>.incomplete`."""
    pattern = re.sub(r"([*?\[])", r"[\1]", blob.name) + "*.incomplete"
    return sorted(blob.parent.glob(pattern))


def _adopt_partial(blob: Path, keep: bool) -> Path:
    """Our partial file of the blob: the longest half file left (ours, or huggingface_hub's
    over HTTP, also written from the start), the others deleted (all of them for a Xet
    download, which writes out of order). Under the blob's lock nobody is writing them."""
    ours = blob.with_name(blob.name + ".incomplete")
    found = sorted(_partials(blob), key=lambda p: p.stat().st_size)
    for stale in found[:-1] if keep else found:
        stale.unlink(missing_ok=True)
    if keep and found and found[-1] != ours:
        os.replace(found[-1], ours)
    return ours


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
