"""The worker's own model download, against the stand-in Hub (fakes/hub.py) over real HTTP.

What is checked is what the stand-in served (bytes per file, Range headers) and what the
cache holds afterwards, so a downloader that fetched too much, fetched a file twice or
wrote a wrong byte fails. Processes are killed and raced for real; where one must reach a
point first, the stand-in holds that file's body at a byte until the test releases it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fakes.hub import VALID_TOKEN, Hub
from fakes.vllm import free_port
from support.workers import wait_until
from worker.launch.download import (
    DownloadError,
    download_model,
    plan_download,
    select_files,
)
from worker.launch.download_transfer import Progress, final_line, human_bytes, progress_line

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: it writes in these
OTHER_TOKEN = "hf_stand_in_other_account"
SMALL = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
         "tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b'{"a": 1}',
         "generation_config.json": b"{}", "chat_template.jinja": b"{{ messages }}"}
RUN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)
from worker.launch.download import DownloadError, download_model
try:
    r = download_model(**json.loads(sys.argv[1]))
    print(json.dumps({"downloaded": r.bytes_downloaded, "present": r.bytes_present,
                      "waited": r.waited, "path": r.path}))
except DownloadError as e:
    print(json.dumps({"error": str(e), "permanent": e.permanent}))
"""


def make_repo(root: Path, repo_id: str, files: dict[str, bytes | int],
              options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A repo of the stand-in; an int is that many random bytes."""
    folder = root / repo_id
    contents = {}
    for name, content in files.items():
        data = os.urandom(content) if isinstance(content, int) else content
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        contents[name] = data
    if options is not None:
        (root / f"{repo_id}.hub.json").write_text(json.dumps(options))
    return contents


def sharded(big: int = 24 * 1024 * 1024, small: int = 6 * 1024 * 1024) -> dict[str, bytes | int]:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    return {**SMALL, "model-00001-of-00002.safetensors": big,
            "model-00002-of-00002.safetensors": small,
            "model.safetensors.index.json": json.dumps(index).encode()}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(tmp_path / "hub", tokens=(VALID_TOKEN, OTHER_TOKEN)) as running:
        yield running


def snapshot_bytes(path: str) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def spawn(hub: Hub, cache: Path, log: Path, **extra: Any) -> subprocess.Popen[str]:
    args = {"repo_id": "org/model", "cache_dir": str(cache), "endpoint": hub.url,
            "progress_interval": 0.2, **extra}
    with log.open("w") as errors:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(args)], cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, text=True,
                                stdout=subprocess.PIPE, stderr=errors)


def test_the_weights_are_those_vllm_loads_in_the_format_it_picks() -> None:
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "original/consolidated.00.pth", "metal/model.bin", "model-q4.gguf", "model.onnx",
            "flax_model.msgpack", "tf_model.h5", "README.md", "tokenizer.model", "vocab.txt",
            "training_args.bin", "additional_chat_templates/tools.jinja", "images/logo.png",
            "1_Pooling/config.json", "2_Dense/model.safetensors", "2_Dense/pytorch_model.bin"]
    small = ["1_Pooling/config.json", "2_Dense/model.safetensors",
             "additional_chat_templates/tools.jinja", "config.json", "tokenizer.model",
             "vocab.txt"]
    assert select_files(repo, "auto", None, "o/m")[0] == sorted([*small, "model.safetensors"])
    assert select_files([*repo, "model.pt"], "pt", None, "o/m")[0] == sorted([*small, "model.pt"])
    with pytest.raises(DownloadError, match=r"o/m has no weight files vLLM loads with LOAD_FORMAT "
                                            r"pt \(top-level \*.safetensors, \*.bin or \*.pt\)"):
        select_files(repo, "pt", None, "o/m")  # original/*.pth is not top-level
    bins = select_files([n for n in repo if n != "model.safetensors"], "auto", None, "o/m")[0]
    assert bins == sorted([*small, "pytorch_model.bin", "pytorch_model.bin.index.json"])
    mistral = ["config.json", "params.json", "tekken.json", "consolidated.safetensors",
               "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert select_files(mistral, "auto", None, "o/m")[0] == [
        "config.json", "consolidated.safetensors", "params.json", "tekken.json"]
    files, why = select_files(mistral, "safetensors", {"model-00001-of-00001.safetensors"}, "o/m")
    assert files == ["config.json", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "params.json", "tekken.json"]
    assert why == ("weights: 1 *.safetensors files named by model.safetensors.index.json "
                   "(LOAD_FORMAT safetensors)")
    with pytest.raises(DownloadError, match="GGUF weights are not supported"):
        select_files(["config.json", "model-q4.gguf"], "auto", None, "o/m")
    with pytest.raises(DownloadError, match="LOAD_FORMAT tensorizer names files"):
        select_files(repo, "tensorizer", None, "o/m")


def test_the_lines_read_as_a_person_says_sizes_rates_and_durations() -> None:
    assert progress_line("org/model", 12_400_000_000, 65_200_000_000, 261e6) == (
        "Downloading org/model: 12.4 GB of 65.2 GB (19%), 261 MB/s, 3 m 22 s left")
    assert progress_line("org/model", 0, 2_000_000, 0) == (
        "Downloading org/model: 0 B of 2.0 MB (0%), 0 B/s, time left unknown")
    assert final_line("org/model", 65_200_000_000, 250, 3_100_000_000) == (
        "Downloaded org/model: 65.2 GB in 4 m 10 s, 261 MB/s (3.1 GB were already in the cache)")
    assert final_line("org/model", 1_500_000_000_000, 3725, 0) == (
        "Downloaded org/model: 1.5 TB in 1 h 02 m, 403 MB/s")
    assert final_line("org/model", 900_000, 1.25, 0) == (
        "Downloaded org/model: 900.0 kB in 1.2 s, 720 kB/s")


def test_a_xet_download_counts_the_bytes_written_once() -> None:
    """huggingface_hub hands a Xet download's reporter the same tqdm_class: its network bytes
    go to `update_transfer`, only the bytes written to the file to `update` (private API:
    this guards the assumption)."""
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    progress = Progress("org/model", 1000, logging.getLogger("test.download"))
    with XetDownloadProgressReporter(reconstruction_desc="f", total=1000, log_level=logging.INFO,
                                     tqdm_class=progress.bar()) as reporter:
        for written, received in ((300, 500), (1000, 1000)):
            reporter.update_progress(SimpleNamespace(
                total_bytes_completed=written, total_transfer_bytes_completed=received,
                total_bytes_completion_rate=None, total_transfer_bytes_completion_rate=None,
                total_bytes=1000))
    assert progress.done == 1000


def test_only_the_files_vllm_loads_are_requested_and_the_snapshot_is_exact(
        hub: Hub, tmp_path: Path) -> None:
    files = make_repo(hub.root, "org/model", {
        **sharded(3_000_000, 2_000_000), "pytorch_model.bin": 3_000_000,
        "pytorch_model.bin.index.json": b'{"weight_map": {"a": "pytorch_model.bin"}}',
        "original/consolidated.00.pth": 1_000_000, "metal/model.bin": 1_000_000,
        "model-Q4_K_M.gguf": 1_000_000, "onnx/model.onnx": 1_000_000, "README.md": b"# hi"})
    wanted = {n: b for n, b in files.items() if n in SMALL or n.startswith("model")
              and not n.endswith(".gguf")}
    result = download_model("org/model", cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    assert set(hub.stats()["served"]) == {f"org/model/{n}" for n in wanted}
    assert all(len(hub.body_gets(f"org/model/{n}")) == 1 for n in wanted)
    assert snapshot_bytes(result.path) == wanted
    assert result.bytes_downloaded + result.bytes_present == sum(map(len, wanted.values()))
    # Offline, the snapshot is found without a request; a second online call fetches nothing.
    requests = len(hub.stats()["requests"])
    again = download_model("org/model", cache_dir=str(tmp_path / "cache"), offline=True)
    assert again.path == result.path and len(hub.stats()["requests"]) == requests
    assert download_model("org/model", cache_dir=str(tmp_path / "cache"),
                          endpoint=hub.url).bytes_downloaded == 0
    assert sum(hub.stats()["served"].values()) == sum(map(len, wanted.values()))


def test_the_plan_gives_each_file_its_size_and_what_the_cache_holds(
        hub: Hub, tmp_path: Path) -> None:
    files = make_repo(hub.root, "org/model", sharded(2_000_000, 1_000_000))
    cache = str(tmp_path / "cache")
    before = plan_download("org/model", cache_dir=cache, endpoint=hub.url)
    assert {f.name: f.size for f in before.files} == {n: len(b) for n, b in files.items()}
    index = len(files["model.safetensors.index.json"])  # read by the plan itself
    assert (before.present_bytes, before.total_bytes) == (index, sum(map(len, files.values())))
    assert not any(hub.body_gets(f"org/model/{n}") for n in files if "index" not in n)
    download_model("org/model", cache_dir=cache, endpoint=hub.url)
    blob = tmp_path / "cache/models--org--model/blobs" / hashlib.sha256(
        files["model-00002-of-00002.safetensors"]).hexdigest()
    blob.unlink()
    after = plan_download("org/model", cache_dir=cache, endpoint=hub.url)
    assert after.missing_bytes == 1_000_000
    assert [f.name for f in after.files if not f.present] == ["model-00002-of-00002.safetensors"]
    assert after.describe()[0] == (
        f"org/model at {after.commit[:12]} (main): 8 files, {human_bytes(after.total_bytes)}, "
        f"{human_bytes(after.present_bytes)} in the cache {cache}, 1.0 MB to download; weights: "
        "2 *.safetensors files named by model.safetensors.index.json (LOAD_FORMAT auto)")


LINE = re.compile(r"Downloading org/model: ([\d.]+ [kMG]?B) of ([\d.]+ [kMG]?B) \((\d+)%\), "
                  r"([\d.]+) (MB|kB|B)/s, (.+)")


def seconds_of(duration: str) -> float:
    """`1.4 s`, `3 m 22 s`, `1 h 05 m` in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = duration.split()
    return sum(float(n) * units[u] for n, u in zip(parts[::2], parts[1::2], strict=True))


def test_progress_lines_count_the_bytes_served_at_the_rate_served(
        hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = make_repo(hub.root, "org/model", sharded(big=24_000_000, small=6_000_000))
    cache = str(tmp_path / "cache")
    download_model("org/model", cache_dir=cache, endpoint=hub.url)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / "cache/models--org--model/blobs" / hashlib.sha256(files[name]).hexdigest()
         ).unlink()
    hub.reset()
    hub.rate = rate = 12_000_000
    with caplog.at_level(logging.INFO, logger="test.download"):
        result = download_model("org/model", cache_dir=cache, endpoint=hub.url,
                                progress_interval=0.25, logger=logging.getLogger("test.download"))
    served = sum(hub.stats()["served"].values())
    assert served == result.bytes_downloaded == 30_000_000
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if m.startswith("Downloading org/model: ") and "%" in m]
    assert len(lines) >= 4, messages
    done = []
    for line in lines:
        got, total, percent, figure, unit, left = LINE.fullmatch(line).groups()  # type: ignore
        assert total == "30.0 MB"
        speed = float(figure) * {"MB": 1e6, "kB": 1e3, "B": 1}[unit]
        assert speed <= rate * 1.15, line  # what reached the disk, never more than was sent
        value = float(got.split()[0]) * {"MB": 1e6, "kB": 1e3, "B": 1}[got.split()[1]]
        done.append(value)
        assert abs(int(percent) - 100 * value / 30e6) <= 1, line  # of the rounded figure
        if speed > 0:
            expected = (30e6 - value) / speed
            assert abs(seconds_of(left.removesuffix(" left")) - expected) <= 0.3 + expected / 8
        else:
            assert left == "time left unknown"
    assert done == sorted(done) and done[-1] <= 30e6
    present = sum(map(len, files.values())) - 30_000_000
    final = messages[-1]
    assert final.startswith("Downloaded org/model: 30.0 MB in ")
    assert final.endswith(f" ({human_bytes(present)} were already in the cache)")
    assert 0.6 * rate <= result.rate <= 1.15 * rate, final
    assert result.summary() == "downloaded" + final.split(":", 1)[1]


def test_a_killed_download_resumes_where_it_stopped_and_keeps_the_finished_files(
        hub: Hub, tmp_path: Path) -> None:
    files = make_repo(hub.root, "org/model", sharded())
    big, small = (f"org/model/model-0000{n}-of-00002.safetensors" for n in (1, 2))
    cache = tmp_path / "cache"
    hub.hold(big, after=15 * 1024 * 1024)
    first = spawn(hub, cache, tmp_path / "first.log")
    blobs = cache / "models--org--model/blobs"
    small_blob = blobs / hashlib.sha256(files[small.split("/", 2)[2]]).hexdigest()
    try:
        assert hub.held.wait(30), (tmp_path / "first.log").read_text()
        partial = blobs / (hashlib.sha256(files[big.split("/", 2)[2]]).hexdigest() + ".incomplete")
        wait_until(lambda: small_blob.exists() and partial.exists()
                   and partial.stat().st_size >= CHUNK, 30, "a finished file and a written chunk")
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.communicate(timeout=10)
        hub.release()
    kept = partial.stat().st_size
    assert kept % CHUNK == 0 and kept < len(files[big.split("/", 2)[2]])
    result = download_model("org/model", cache_dir=str(cache), endpoint=hub.url)
    assert hub.body_gets(big) == [None, f"bytes={kept}-"]
    assert hub.body_gets(small) == [None]  # finished before the kill: not fetched again
    served = hub.stats()["served"]
    size = sum(map(len, files.values()))
    assert sum(served.values()) <= size + CHUNK
    assert result.bytes_present >= kept
    assert snapshot_bytes(result.path) == files
    assert not list(blobs.glob("*.incomplete"))


def test_two_downloaders_at_once_fetch_each_file_once_and_one_says_it_waits(
        hub: Hub, tmp_path: Path) -> None:
    files = make_repo(hub.root, "org/model", sharded(3_000_000, 2_000_000))
    cache = tmp_path / "cache"
    hub.hold("org/model/model-00001-of-00002.safetensors", after=1_000_000)
    first = spawn(hub, cache, tmp_path / "first.log")
    second = None
    try:
        assert hub.held.wait(30), (tmp_path / "first.log").read_text()
        second = spawn(hub, cache, tmp_path / "second.log")
        wait_until(lambda: "Waiting for another worker" in (tmp_path / "second.log").read_text(),
                   30, "the second downloader to wait")
        hub.release()
        outputs = [json.loads(p.communicate(timeout=60)[0]) for p in (first, second)]
    finally:
        hub.release()
        for process in (first, second):
            if process is not None:
                process.kill()
                process.communicate(timeout=10)
    waiting = (tmp_path / "second.log").read_text().splitlines()[0]
    assert waiting == (f"Waiting for another worker downloading org/model into {cache} (lock "
                       f"{cache}/.locks/models--org--model/worker-download-main.lock)")
    assert all(len(hub.body_gets(f"org/model/{name}")) == 1 for name in files)
    assert outputs[0]["downloaded"] + outputs[0]["present"] == sum(map(len, files.values()))
    assert outputs[1]["downloaded"] == 0 and outputs[1]["waited"] > 0
    assert outputs[0]["path"] == outputs[1]["path"]
    assert snapshot_bytes(outputs[1]["path"]) == files


def test_a_dropped_connection_is_resumed_with_a_range_request(hub: Hub, tmp_path: Path) -> None:
    files = make_repo(hub.root, "org/model", sharded(16_000_000, 1_000))
    big = "org/model/model-00001-of-00002.safetensors"
    hub.drop(big, after=12_000_000)
    result = download_model("org/model", cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    assert hub.body_gets(big) == [None, f"bytes={CHUNK}-"]
    assert snapshot_bytes(result.path) == files


def verdict(hub: Hub, tmp_path: Path, repo: str = "org/model", **kwargs: Any) -> DownloadError:
    with pytest.raises(DownloadError) as raised:
        download_model(repo, cache_dir=str(tmp_path / "cache"), endpoint=hub.url, **kwargs)
    return raised.value


def test_gated_private_and_missing_repos_and_revisions_give_their_sentences(
        hub: Hub, tmp_path: Path) -> None:
    make_repo(hub.root, "org/gated", sharded(1000, 1000), {"gated": True, "granted": [VALID_TOKEN]})
    make_repo(hub.root, "org/private", sharded(1000, 1000), {"private": True})
    make_repo(hub.root, "org/model", sharded(1000, 1000))
    url = hub.url
    cases = {
        ("org/gated", None): f"org/gated is gated: accept its terms on {url}/org/gated and set "
                             "HF_TOKEN to a token of an account that has access",
        ("org/gated", OTHER_TOKEN): f"HF_TOKEN's account has no access to the gated org/gated: "
                                    f"accept its terms on {url}/org/gated with that account, or "
                                    "set HF_TOKEN to a token of an account that has access",
        ("org/model", "hf_revoked"): f"{url} refused HF_TOKEN for org/model (401: Invalid "
                                     "credentials in Authorization header): set HF_TOKEN to a "
                                     "valid token with read access",
        ("org/absent", None): f"org/absent does not exist on {url} or is private: check "
                              "MODEL_NAME (for a private repo, set HF_TOKEN)",
        ("org/private", None): f"org/private does not exist on {url} or is private: check "
                               "MODEL_NAME (for a private repo, set HF_TOKEN)",
        ("org/absent", VALID_TOKEN): f"org/absent does not exist on {url} or is private: check "
                                     "MODEL_NAME and that HF_TOKEN's account can read it"}
    for (repo, token), sentence in cases.items():
        error = verdict(hub, tmp_path, repo, token=token)
        assert (str(error), error.permanent) == (sentence, True), (repo, token)
    error = verdict(hub, tmp_path, revision="v9")
    assert (str(error), error.permanent) == (
        "Revision v9 of org/model does not exist: set MODEL_REVISION to a branch, tag or commit "
        "of it", True)
    hub.reset()
    served = download_model("org/gated", cache_dir=str(tmp_path / "ok"), endpoint=url,
                            token=VALID_TOKEN)
    assert Path(served.path, "config.json").read_bytes() == SMALL["config.json"]
    sent = {(r["path"].startswith("/_cdn/"), r["auth"]) for r in hub.stats()["requests"]}
    assert sent == {(False, True), (True, False)}  # the token never leaves the Hub


def test_offline_without_a_copy_and_no_network_give_their_sentences(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as offline:
        download_model("org/model", cache_dir=str(tmp_path), offline=True)
    assert (str(offline.value), offline.value.permanent) == (
        f"org/model (revision main) is not complete in the cache {tmp_path} (it is not a folder) "
        "and HF_HUB_OFFLINE is set, so it cannot be downloaded: unset HF_HUB_OFFLINE, or put the "
        "model on the volume first", True)
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError) as unreachable:
        download_model("org/model", cache_dir=str(tmp_path), endpoint=nowhere)
    assert str(unreachable.value).startswith(f"Cannot reach {nowhere} to download org/model (")
    assert str(unreachable.value).endswith(
        f"and it is not complete in {tmp_path}: check the worker's network; transient, a restart "
        "retries")
    assert unreachable.value.permanent is False


def test_hf_hub_offline_in_the_environment_is_a_verdict_too(hub: Hub, tmp_path: Path) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: then every request fails."""
    make_repo(hub.root, "org/model", sharded(1000, 1000))
    run = subprocess.run([sys.executable, "-c", RUN, json.dumps(
        {"repo_id": "org/model", "cache_dir": str(tmp_path), "endpoint": hub.url})],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=60)
    assert json.loads(run.stdout) == {"error": (
        "HF_HUB_OFFLINE is set, so org/model cannot be downloaded and it is not complete in "
        f"{tmp_path}: unset HF_HUB_OFFLINE or put the model on the volume first"),
        "permanent": True}
    assert hub.stats()["requests"] == []


def test_too_little_space_is_a_verdict_before_any_weight_is_fetched(
        hub: Hub, tmp_path: Path) -> None:
    make_repo(hub.root, "org/model", sharded(3_000_000, 2_000_000))
    cache = tmp_path / "cache"
    error = verdict(hub, tmp_path, free_space=lambda path: 1_500_000)
    assert (str(error), error.permanent) == (
        f"Not enough disk space for org/model: 5.0 MB to download, 1.5 MB free in {cache}: give "
        "the network volume more room (or free some), or set HF_HOME to a larger disk", True)
    assert set(hub.stats()["served"]) == {"org/model/model.safetensors.index.json"}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB file system (root may mount one; elsewhere the test is skipped)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_verdict_before_and_during_the_download(
        hub: Hub, tmpfs: Path) -> None:
    make_repo(hub.root, "org/model", sharded(3_000_000, 2_000_000))
    with pytest.raises(DownloadError, match="Not enough disk space for org/model: 5.0 MB to "
                                            r"download, 4.\d MB free in "):
        download_model("org/model", cache_dir=str(tmpfs), endpoint=hub.url)
    with pytest.raises(DownloadError) as full:  # space that is not there: the write fails
        download_model("org/model", cache_dir=str(tmpfs), endpoint=hub.url,
                       free_space=lambda path: 10**12)
    assert (str(full.value), full.value.permanent) == (
        f"The disk is full: {tmpfs} ran out of space while org/model was being downloaded: give "
        "the network volume more room (or free some), or set HF_HOME to a larger disk", True)
