"""A stand-in Hugging Face Hub serving model repos from a folder, as huggingface_hub 2.4 asks.

`DIR/<org>/<name>/` is a repo of one commit (`main`, or its sha); `DIR/<org>/<name>.hub.json`
may say `{"gated": true}` or `{"private": true}`, and `"granted": [tokens]` (default: any valid
token). `GET /api/models/{repo}[/revision/{rev}]` (`?blobs=true`: sizes, blob ids, LFS) and
`GET /api/models/{repo}/tree/{rev}[/{path}]` list it; `HEAD|GET /{repo}/resolve/{rev}/{path}`
serves a small file itself (`ETag` its git blob id, `X-Repo-Commit`) and an LFS one (weights,
or 10 MB and more) by a 302 (`X-Linked-Etag` its sha256, `X-Linked-Size`) to the "CDN" on a
second port: another origin, so the client drops `Authorization` as with the real CDN. Range
requests get 206; no `X-Xet-Hash` is sent, so huggingface_hub downloads over HTTP. Errors are
the real Hub's (`X-Error-Code`, `X-Error-Message`): 401 `RepoNotFound` without a token (404
with one) for a missing or private repo, 401 `GatedRepo` for a gated repo's files (403 with a
token not granted), 404 `RevisionNotFound`/`EntryNotFound`, 401 "Invalid credentials in
Authorization header". `GET /_stats`: each request and the body bytes sent per `org/name/path`;
`POST /_control`: `{"rate": B}`, `{"hold": {"path", "after"}}` (stop that body at byte `after`
until `{"release": true}`), `{"drop": {"path", "after"}}` (close the connection there, once),
`{"reset": true}` (in a thread: the same methods of `Hub`). Bodies go out in 64 KiB pieces at
`rate` bytes/s over all connections (0: no limit). `python -m fakes.hub --root DIR --port P
--rate BYTES_PER_S [--token T ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack",
                ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
PIECE = 64 * 1024
VALID_TOKEN = "hf_stand_in_valid_token"
_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)"
                  r"(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<path>/.*)?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class HubFile:
    path: str
    local: Path
    size: int
    oid: str  # git blob id
    sha256: str | None  # set for an LFS file


@dataclass(frozen=True)
class Repo:
    id: str
    commit: str
    files: dict[str, HubFile]
    gated: bool
    private: bool
    granted: frozenset[str] | None  # None: every valid token


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class Hub:
    """The stand-in's state and its two servers (Hub and CDN); a context manager."""

    def __init__(self, root: str | Path, port: int = 0, rate: float = 0,
                 tokens: tuple[str, ...] = (VALID_TOKEN,)) -> None:
        self.root, self.rate, self.tokens = Path(root), rate, frozenset(tokens)
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._next_send = 0.0
        self._stops: dict[str, tuple[str, int]] = {}  # "hold" or "drop": (file, at byte)
        self.held, self.released = threading.Event(), threading.Event()
        self.requests: list[dict[str, Any]] = []
        self.served: dict[str, int] = {}
        self.api, self.cdn = (ThreadingHTTPServer(("127.0.0.1", number), type(
            "Handler", (_Handler,), {"hub": self, "is_cdn": cdn})) for number, cdn in
            ((port, False), (0, True)))
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def __enter__(self) -> Hub:
        for server in (self.api, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.released.set()
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    # What the tests read and set (the HTTP routes /_stats and /_control call these too).
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": [dict(r) for r in self.requests], "served": dict(self.served)}

    def body_gets(self, key: str) -> list[str | None]:
        """The Range header (None: whole file) of each GET that sent `key`'s bytes."""
        return [r["range"] for r in self.stats()["requests"]
                if r["file"] == key and r["method"] == "GET" and r["status"] in (200, 206)]

    def hold(self, path: str, after: int) -> None:
        """Stop `path`'s next body at byte `after` (`held` is set) until `release()`."""
        self.held.clear()
        self.released.clear()
        with self._lock:
            self._stops["hold"] = (path, after)

    def release(self) -> None:
        self.released.set()

    def drop(self, path: str, after: int) -> None:
        """Close the connection of `path`'s next body at byte `after`."""
        with self._lock:
            self._stops["drop"] = (path, after)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()
            self._stops.clear()
        self.released.set()

    def control(self, order: dict[str, Any]) -> None:
        self.rate = float(order.get("rate", self.rate))
        for kind in ("hold", "drop"):
            if kind in order:
                getattr(self, kind)(order[kind]["path"], int(order[kind]["after"]))
        for action in ("release", "reset"):
            if order.get(action):
                getattr(self, action)()

    def repo(self, repo_id: str) -> Repo | None:
        folder = self.root / repo_id
        if ".." in repo_id.split("/") or not folder.is_dir():
            return None
        sidecar = folder.with_name(folder.name + ".hub.json")
        options = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        files = {(path := p.relative_to(folder).as_posix()): self._file(path, p)
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        commit = hashlib.sha1(json.dumps([[f.path, f.oid] for f in files.values()]).encode())
        granted = options.get("granted")
        return Repo(repo_id, commit.hexdigest(), files, bool(options.get("gated")),
                    bool(options.get("private")), None if granted is None else frozenset(granted))

    def _file(self, path: str, local: Path) -> HubFile:
        stat = local.stat()
        key = (str(local), stat.st_size, stat.st_mtime_ns)
        if (known := self._hashes.get(key)) is None:  # once per version of the file
            git, sha = hashlib.sha1(b"blob %d\0" % stat.st_size), hashlib.sha256()
            with local.open("rb") as f:
                while block := f.read(1 << 20):
                    git.update(block)
                    sha.update(block)
            known = self._hashes[key] = (git.hexdigest(), sha.hexdigest())
        lfs = path.endswith(LFS_SUFFIXES) or stat.st_size >= LFS_MIN_SIZE
        return HubFile(path, local, stat.st_size, known[0], known[1] if lfs else None)

    def visible(self, repo_id: str, token: str | None) -> Repo:
        """The repo if this token may see it (RepoNotFound as the Hub says it otherwise)."""
        repo = self.repo(repo_id)
        if repo is None or (repo.private and not self._granted(repo, token)):
            raise HubError(404 if token else 401, "Repository not found", "RepoNotFound")
        return repo

    def _granted(self, repo: Repo, token: str | None) -> bool:
        return token is not None and (repo.granted is None or token in repo.granted)

    def readable(self, repo: Repo, token: str | None) -> None:
        """A gated repo's files need a granted token."""
        if repo.gated and not self._granted(repo, token):
            raise HubError(403, f"Access to model {repo.id} is restricted and you are not in the "
                           f"authorized list. Visit https://huggingface.co/{repo.id} to ask for "
                           "access.", "GatedRepo") if token else HubError(
                401, f"Access to model {repo.id} is restricted. You must have access to it and "
                "be authenticated to access it. Please log in.", "GatedRepo")

    @staticmethod
    def revision(repo: Repo, rev: str) -> None:
        if rev not in ("main", repo.commit) and not (len(rev) >= 7 and repo.commit.startswith(rev)):
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def pace(self, size: int) -> None:
        """Wait for this piece's turn at the shared rate (pacing, not synchronisation)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + size / self.rate if self.rate > 0 else now
        time.sleep(max(0.0, start - now))

    def stop_at(self, key: str, start: int, end: int) -> tuple[int, str | None]:
        """Where the body from `start` to `end` must stop early (hold or drop), and why."""
        with self._lock:
            stops = [(at, kind) for kind, (path, at) in self._stops.items()
                     if path == key and start <= at < end]
        return min(stops) if stops else (end, None)

    def at_stop(self, kind: str) -> None:
        with self._lock:
            del self._stops[kind]
        if kind == "hold":
            self.held.set()
            self.released.wait(120)

    def count(self, key: str, sent: int) -> None:
        with self._lock:
            self.served[key] = self.served.get(key, 0) + sent


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    hub: Hub
    is_cdn: bool

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _answer(self) -> None:
        url = urlsplit(self.path)
        self.record: dict[str, Any] = {"method": self.command, "path": unquote(url.path),
                                       "file": None, "status": 0, "range": self.headers.get(
                                           "Range"), "auth": "Authorization" in self.headers}
        if url.path not in ("/_stats", "/_control"):  # first: a client may ask before we end
            with self.hub._lock:
                self.hub.requests.append(self.record)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if self.is_cdn:
                self._cdn(url.path, parse_qs(url.query))
            elif url.path == "/_stats":
                self._json(200, self.hub.stats())
            elif url.path == "/_control":
                self.hub.control(json.loads(body or b"{}"))
                self._json(200, {"ok": True})
            else:
                self._hub(url.path, parse_qs(url.query))
        except HubError as error:
            headers = {"X-Error-Message": error.message, "X-Error-Code": error.code,
                       "X-Repo-Commit": error.commit}
            self._json(error.status, {"error": error.message},
                       {k: v for k, v in headers.items() if v})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_HEAD = do_GET = do_POST = _answer

    def _token(self) -> str | None:
        if not (auth := self.headers.get("Authorization")):
            return None
        if (token := auth.removeprefix("Bearer ").strip()) not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _hub(self, path: str, query: dict[str, list[str]]) -> None:
        token = self._token()
        if api := _API.match(path):
            repo = self.hub.visible(unquote(api["repo"]), token)
            self.hub.revision(repo, unquote(api["rev"] or "main"))
            if api["kind"] == "tree":
                inner = unquote(api["path"] or "").strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(200, _tree(repo, inner, recursive))
            return self._json(200, _info(repo, query.get("blobs", ["false"])[0] == "true"))
        resolve = _RESOLVE.match(path)
        if resolve is None:
            raise HubError(404, "Sorry, we can't find the page you are looking for.")
        repo = self.hub.visible(resolve["repo"], token)
        self.hub.revision(repo, unquote(resolve["rev"]))
        self.hub.readable(repo, token)
        name = unquote(resolve["path"])
        file = repo.files.get(name)
        self.record["file"] = f"{repo.id}/{name}"
        if file is None:
            raise HubError(404, "Entry not found", "EntryNotFound", repo.commit)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{file.oid}"'}
        if file.sha256 is None:
            return self._send_file(file, self.record["file"], headers)
        location = (f"{self.hub.cdn_url}/_cdn/{file.sha256}?repo={quote(repo.id)}"
                    f"&file={quote(name)}&Expires=9999999999&Signature=stand-in")
        self._status(302, {**headers, "Location": location, "X-Linked-Etag": f'"{file.sha256}"',
                           "X-Linked-Size": str(file.size), "Content-Length": "0"})

    def _cdn(self, path: str, query: dict[str, list[str]]) -> None:
        repo = self.hub.repo(query.get("repo", [""])[0])
        file = repo.files.get(query.get("file", [""])[0]) if repo else None
        if repo is None or file is None or path != f"/_cdn/{file.sha256}":
            raise HubError(403, "Access Denied")
        self.record["file"] = f"{repo.id}/{file.path}"
        self._send_file(file, self.record["file"], {"ETag": f'"{file.sha256}"'})

    def _send_file(self, file: HubFile, key: str, headers: dict[str, str]) -> None:
        start, end, status = 0, file.size, 200
        if (wanted := _RANGE.match(self.headers.get("Range", "").strip())) and wanted[1]:
            start, end, status = int(wanted[1]), min(int(wanted[2] or file.size - 1) + 1,
                                                     file.size), 206
            if start >= file.size:
                raise HubError(416, "Requested Range Not Satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        self._status(status, {**headers, "Content-Length": str(end - start), "Accept-Ranges":
                              "bytes", "Content-Type": "application/octet-stream"})
        with file.local.open("rb") as source:
            source.seek(position := start)
            while position < end and self.command == "GET":
                stop, why = self.hub.stop_at(key, position, end)
                while position < stop:
                    piece = source.read(min(PIECE, stop - position))
                    self.hub.pace(len(piece))
                    self.hub.count(key, len(piece))  # before: the client may ask once it has it
                    self.wfile.write(piece)
                    position += len(piece)
                if why is not None:
                    self.hub.at_stop(why)
                if why == "drop":
                    self.close_connection = True
                    return self.connection.shutdown(socket.SHUT_RDWR)

    def _status(self, status: int, headers: dict[str, Any]) -> None:
        self.record["status"] = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _json(self, status: int, value: Any, headers: dict[str, Any] | None = None) -> None:
        data = json.dumps(value).encode()
        self._status(status, {**(headers or {}), "Content-Type": "application/json",
                              "Content-Length": str(len(data))})
        if self.command != "HEAD":
            self.wfile.write(data)


def _info(repo: Repo, blobs: bool) -> dict[str, Any]:
    siblings = [{"rfilename": f.path, **({"size": f.size, "blobId": f.oid} if blobs else {}),
                 **({"lfs": {"size": f.size, "sha256": f.sha256, "pointerSize": 134}}
                    if blobs and f.sha256 else {})}
                for f in repo.files.values()]
    return {"_id": repo.commit[:24], "id": repo.id, "modelId": repo.id,
            "author": repo.id.split("/")[0], "sha": repo.commit, "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
            "lastModified": "2025-01-01T00:00:00.000Z", "siblings": siblings,
            "usedStorage": sum(f.size for f in repo.files.values())}


def _entry(file: HubFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": file.oid, "size": file.size, "path": file.path}
    if file.sha256:
        entry["lfs"] = {"size": file.size, "oid": file.sha256, "pointerSize": 134}
    return entry


def _tree(repo: Repo, inner: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{inner}/" if inner else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, file in repo.files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "size": 0, "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
        if recursive or len(parts) == 1:
            entries[path] = _entry(file)
    if inner and not entries:
        raise HubError(404, "Entry not found", "EntryNotFound", repo.commit)
    return list(entries.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of <org>/<name> repos")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0, help="bytes/s in total; 0: no limit")
    parser.add_argument("--token", action="append", help="a valid token (repeatable)")
    args = parser.parse_args()
    with Hub(args.root, args.port, args.rate, tuple(args.token or (VALID_TOKEN,))) as hub:
        print(f"Hub stand-in on {hub.url} (CDN {hub.cdn_url}), pid {os.getpid()}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
