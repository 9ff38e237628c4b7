"""The benchmark suite's quick mode runs end to end and writes well-formed results.

Only that it runs and what it writes are checked, never a timing: figures from a
quick run (small counts, a shared CI machine) mean nothing. Scenario 5 reuses the
session's real endpoint (vLLM's CPU build on the tiny model), and scenarios 7 and 8
the vLLM behind it; scenarios 9 and 10 start their workers on the stand-in vLLM. One thing
a quick run does prove is checked: scenario 11 delivered every byte of every stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.real_vllm import REPO, RealEndpoint

SCENARIOS = ["1_overhead", "2_stream_relay", "3_stream_posts", "4_startup", "5_real_vllm",
             "6_memory", "7_first_token", "8_bench_serve", "9_cold_start", "10_lora",
             "11_relay_ceiling"]
HEADINGS = ["## Targets", "## 1. Request overhead", "## 2. Stream relay",
            "## 3. Stream posts and latency", "## 4. Start-up", "## 5. Real vLLM on CPU",
            "## 6. Worker memory", "## 7. First content token", "## 8. vllm bench serve",
            "## 9. Cold start", "## 10. LoRA adapters", "## 11. The relay's ceiling"]
TARGETS = 21


def test_quick_mode_writes_every_scenario_as_json_and_markdown(
        tmp_path: Path, real_endpoint: RealEndpoint) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path),
         "--real-endpoint", real_endpoint.url, "--real-vllm", real_endpoint.vllm_url],
        cwd=REPO, env={**os.environ, "LOCAL_API_KEY": real_endpoint.api_key},
        capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, run.stderr[-4000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "quick"
    assert {"date", "cpu_model", "cores"} <= set(results["machine"])
    assert list(results["scenarios"]) == sorted(results["scenarios"])
    assert set(results["scenarios"]) == set(SCENARIOS)
    for name, section in results["scenarios"].items():
        assert "failed" not in section, (name, section)
    for key in ("1_overhead", "2_stream_relay", "3_stream_posts", "5_real_vllm",
                "7_first_token", "8_bench_serve", "9_cold_start", "10_lora", "11_relay_ceiling"):
        assert results["scenarios"][key]["rows"], key
    [eager] = results["scenarios"]["9_cold_start"]["rows"]
    assert "Start-up of tiny-chat: located in" in eager["timeline"]
    lora = results["scenarios"]["10_lora"]
    assert [row["request"] for row in lora["load_rows"]] == [
        "first to an on-demand adapter (loads it)", "the next to that adapter", "the base model"]
    assert [row["requests"] for row in lora["rows"]] == [8, 8], "every adapter request answered"
    ceiling = results["scenarios"]["11_relay_ceiling"]["rows"]
    assert {row["path"][:3] for row in ceiling} == {"dir", "(a)", "(b)", "(c)"}
    for row in ceiling:  # the scenario itself fails on a lost byte; this says it loudly
        assert row["bytes_sent"] > 0 and row["streams_checked"] > 0, row
        assert (row["bytes_lost"], row["streams_mismatched"], row["streams_failed"]) == (
            0, 0, 0), row
    assert len(results["targets"]) == TARGETS
    assert all({"target", "wanted", "measured", "met"} <= set(t) for t in results["targets"])
    assert all(isinstance(t["met"], bool) for t in results["targets"])

    text = (tmp_path / "results.md").read_text()
    positions = [text.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    assert "Not run." not in text and "Failed" not in text
    assert text.count("\n|---") >= 14  # the targets and every scenario's tables


def targets_table(text: str) -> list[str]:
    lines = text[text.index("| target | wanted | measured | met |"):].splitlines()
    return lines[:next(i for i, line in enumerate(lines) if not line.startswith("|"))]


def test_the_readme_publishes_the_latest_results() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    results = (REPO / "benchmarks" / "results" / "results.md").read_text(encoding="utf-8")
    assert targets_table(readme) == targets_table(results)
    assert len(targets_table(readme)) == 2 + TARGETS
    date = json.loads((REPO / "benchmarks" / "results" / "results.json").read_text())
    assert f"Latest run, {date['machine']['date'][:10]}" in readme
