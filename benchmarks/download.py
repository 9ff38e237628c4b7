"""The worker's model download against a plain `huggingface_hub.snapshot_download`.

`python -m benchmarks.download [--rounds 5] [--shards 4] [--shard-mb 64] [--rate-mb 100]`,
from the project root, prints a markdown table.

Both fetch the same files (the ones the worker selects: shards, index, config, tokenizer)
of a repo of random bytes made in a temporary folder, from the same stand-in Hub
(fakes/hub.py, in a process of its own so it does not share this one's interpreter), into a
fresh cache each time: once unthrottled (what each costs on the client's side, loopback
being far faster than any network) and once with the stand-in sending at `--rate-mb` MB/s
in total (a link both should fill). Rounds are interleaved and alternate which goes first;
the table gives medians. Each call's time includes its own requests to the Hub API.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import disable_progress_bars

from benchmarks.processes import PROJECT
from fakes.vllm import free_port
from worker.launch.download import download_model, plan_download


def make_repo(root: Path, shards: int, shard_bytes: int) -> None:
    """`org/model` with `shards` safetensors shards of random bytes, an index and small files."""
    folder = root / "org" / "model"
    folder.mkdir(parents=True)
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for name in names:
        with (folder / name).open("wb") as out:
            for _ in range(shard_bytes // (1 << 20)):
                out.write(os.urandom(1 << 20))
    index = {"metadata": {}, "weight_map": {f"layer.{i}": n for i, n in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {}}}))
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(os.urandom(1 << 20))


def start_hub(root: Path, rate: float) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    hub = subprocess.Popen([sys.executable, "-m", "fakes.hub", "--root", str(root), "--port",
                            str(port), "--rate", str(rate)], cwd=PROJECT, text=True,
                           stdout=subprocess.PIPE)
    assert hub.stdout is not None
    line = hub.stdout.readline()  # it prints once it listens
    assert line.startswith("Hub stand-in on "), line
    return hub, f"http://127.0.0.1:{port}"


def timed(fetch: Callable[[str], object], cache: str) -> float:
    started = time.perf_counter()
    fetch(cache)
    return time.perf_counter() - started


def measure(root: Path, rate: float, rounds: int, scratch: Path) -> list[dict[str, object]]:
    hub, url = start_hub(root, rate)
    try:
        plan = plan_download("org/model", cache_dir=str(scratch / "plan"), endpoint=url)
        names = [f.name for f in plan.files]
        fetchers: dict[str, Callable[[str], object]] = {
            "worker `download_model`": lambda cache: download_model(
                "org/model", cache_dir=cache, endpoint=url),
            "`snapshot_download` (same files)": lambda cache: snapshot_download(
                "org/model", cache_dir=cache, endpoint=url, allow_patterns=names, token=False)}
        times: dict[str, list[float]] = {name: [] for name in fetchers}
        order = list(fetchers)
        for round_ in range(rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(timed(fetchers[name], str(scratch / f"{round_}-{name[:8]}")))
    finally:
        hub.terminate()
        hub.communicate(timeout=10)
    size = plan.total_bytes
    return [{"download": name, "median": statistics.median(values),
             "rate": size / statistics.median(values) / 1e6, "each": values, "bytes": size,
             "files": len(names)}
            for name, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--rate-mb", type=float, default=100.0)
    args = parser.parse_args()
    disable_progress_bars()  # snapshot_download's bars; the worker's lines go to no handler
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder, "hub")
        make_repo(root, args.shards, args.shard_mb << 20)
        rows = []
        for rate in (0.0, args.rate_mb * 1e6):
            for row in measure(root, rate, args.rounds, Path(folder, f"rate-{rate:.0f}")):
                rows.append({**row, "stand-in": "unthrottled" if not rate
                             else f"{args.rate_mb:.0f} MB/s"})
    print(f"Fetching {rows[0]['bytes'] / 1e6:.1f} MB in {rows[0]['files']} files ({args.shards} "
          f"shards), {args.rounds} rounds, medians; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores\n")
    print("| download | stand-in | time | MB/s | each round |")
    print("|---|---|---|---|---|")
    for row in rows:
        each = ", ".join(f"{value:.2f}" for value in row["each"])  # type: ignore[attr-defined]
        print(f"| {row['download']} | {row['stand-in']} | {row['median']:.2f} s | "
              f"{row['rate']:.0f} | {each} s |")


if __name__ == "__main__":
    main()
