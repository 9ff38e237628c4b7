"""test_vllm_command.py, the start-up diagnostic, run as users run it: a subprocess.

Model folders are fabricated; vLLM is the stand-in (fakes.vllm) behind a small
wrapper passed as VLLM_PYTHON: `-m ...` runs the stand-in with the worker's real vLLM
argv, anything else runs Python with a stand-in `vllm` package, so the import check
has something to import. The pure checks are tested with injected numbers, and the
import check once against the real CPU build of vLLM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from fakes.hub import Hub
from fakes.vllm import free_port
from support import STAND_IN_VERSION, stand_in_python
from worker.diagnose import preflight
from worker.diagnose import report as diagnostic
from worker.launch.plan import plan_launches
from worker.masking import secret_flag_values, secret_values
from worker.settings.loader import DEFAULTS, load
from worker.upstream.child import group_members

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT / "test_vllm_command.py"
HF_TOKEN = "hf_diagnostic_secret_token_1234"
API_KEY = "sk-diagnostic-api-key-5678"
FLAG_TOKEN = "hf_flag_only_secret_9999"
GIB = 1 << 30


def model_folder(path: Path, weights: tuple[str, ...] = ("model.safetensors",),
                 config: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in weights:
        (path / name).write_bytes(b"\0" * 1024)
    return path


def base_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(tmp_path / "hf"),
        "VLLM_PYTHON": stand_in_python(tmp_path),
        "VLLM_PORT": str(free_port()),
        "FAKE_VLLM_PID_FILE": str(tmp_path / "vllm.pid"),
        **overrides,
    }


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=timeout)


def run_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, object], str]:
    done = run(env, "--json", *args)
    return done.returncode, json.loads(done.stdout), done.stderr


def assert_vllm_stopped(tmp_path: Path) -> None:
    group = int((tmp_path / "vllm.pid").read_text().split()[1])
    assert group_members(group) == [], "vLLM's process group outlived the diagnostic"


# ------------------------------------------------------------- dry runs --

def test_a_dry_run_shows_the_model_found_the_served_name_and_the_command(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "weights" / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder))
    done = run(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Found model in MODEL_PATH: {folder}" in done.stdout
    assert "served model name (clients send it as `model`): tiny-model" in done.stdout
    settings = load(env)
    [worker] = plan_launches(settings, env)
    assert f"    {shlex.join(worker.argv)}\n" in done.stdout, "not the worker's own command"
    assert f"--model {tmp_path / 'hf' / '.links' / 'tiny-model'} " in done.stdout
    assert f"loads vLLM {STAND_IN_VERSION}" in done.stdout
    assert "Nothing was started" in done.stdout
    assert os.listdir(tmp_path / "hf") == [".links"], "only the worker's link is written"


def test_every_place_searched_is_reported_with_why_it_was_skipped(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    model_folder(hf / "gpt-oss-120b", config=False)
    model_folder(hf / "model-gpt-oss-120b", weights=())
    snapshot = model_folder(hf / "hub" / "models--openai--gpt-oss-120b" / "snapshots" / "abc1",
                            weights=("model-00001-of-00002.safetensors",))
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    code, report, _ = run_json(base_env(tmp_path, HF_HUB_OFFLINE="1"))
    model = report["models"][0]  # type: ignore[index]
    searched = "\n".join(model["searched"])
    assert f"skipped {hf / 'gpt-oss-120b'}: it has no config.json" in searched
    assert f"skipped {hf / 'model-gpt-oss-120b'}: it has no weight files" in searched
    assert f"skipped snapshot {snapshot}: it is incomplete: model-00002-of-00002" in searched
    assert "not found on disk: openai/gpt-oss-120b is downloaded into" in searched
    assert model["is_local"] is False and model["chosen"] == "openai/gpt-oss-120b"
    assert (code, report["failed_step"]) == (diagnostic.EXIT_MODEL, "model")
    assert "HF_HUB_OFFLINE is set, so it cannot be downloaded" in str(report["error"])
    assert report["verdict"]["permanent"] is True  # type: ignore[index]


def test_gguf_weights_fail_at_the_model_step(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "gguf", weights=("model-Q4_K_M.gguf",))
    code, report, _ = run_json(base_env(tmp_path, MODEL_PATH=str(folder)))
    assert (code, report["failed_step"]) == (diagnostic.EXIT_MODEL, "model")
    assert "GGUF weights are not supported" in str(report["error"])


def test_an_invalid_setting_fails_at_the_settings_step_naming_it(tmp_path: Path) -> None:
    done = run(base_env(tmp_path, GPU_MEMORY_UTILIZATION="1.5"))
    assert done.returncode == diagnostic.EXIT_SETTINGS
    assert "FAILED at step 'settings' (exit code 2): GPU_MEMORY_UTILIZATION='1.5'" in done.stdout


def test_json_output_carries_every_step_and_zero_gpus_is_a_warning(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    code, report, _ = run_json(base_env(tmp_path, MODEL_PATH=str(folder), MAX_MODEL_LEN="4096"))
    assert (code, report["ok"], report["failed_step"]) == (0, True, None)
    settings = {row["name"]: row for row in report["settings"]}  # type: ignore[union-attr]
    assert settings["MAX_MODEL_LEN"] == {"name": "MAX_MODEL_LEN", "value": "4096",
                                         "source": "set"}
    assert settings["DTYPE"]["source"] == "default"
    model = report["models"][0]  # type: ignore[index]
    assert (model["chosen"], model["served_model_name"]) == (str(folder), "tiny-model")
    assert model["command"][1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model",
                                     str(tmp_path / "hf" / ".links" / "tiny-model")]
    assert model["command_line"] == shlex.join(model["command"])
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[union-attr]
    assert list(checks) == ["vllm", "gpus", "disk", "memory", "port"]
    assert checks["gpus"]["status"] == "warn" and "0 GPUs visible" in checks["gpus"]["detail"]
    assert checks["memory"]["detail"].startswith("weights 1.0 KiB; ")
    assert report["launch"] is None


def test_locate_only_stops_after_the_command(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), VLLM_PYTHON="/nowhere/python")
    done = run(env, "--locate-only")
    assert done.returncode == 0, done.stdout
    assert "vLLM command:" in done.stdout and "3. Checks" not in done.stdout


@pytest.mark.parametrize(("vllm_python", "words"), [
    ("/nowhere/bin/python", "VLLM_PYTHON=/nowhere/bin/python is not an executable file"),
    (sys.executable, "cannot load vLLM: ModuleNotFoundError: No module named 'vllm'"),
])
def test_a_vllm_python_that_cannot_load_vllm_fails_the_checks(
        tmp_path: Path, vllm_python: str, words: str) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    code, report, _ = run_json(base_env(tmp_path, MODEL_PATH=str(folder),
                                        VLLM_PYTHON=vllm_python))
    assert (code, report["failed_step"]) == (diagnostic.EXIT_CHECK, "checks")
    assert words in str(report["error"])


def test_a_port_in_use_fails_the_checks(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, report, _ = run_json(base_env(tmp_path, MODEL_PATH=str(folder), VLLM_PORT=str(port)))
    assert code == diagnostic.EXIT_CHECK
    assert f"127.0.0.1:{port} (VLLM_PORT) is already in use by process {os.getpid()}" in \
        str(report["error"])


def test_with_vllm_base_url_it_asks_that_server_for_the_served_model(
        tmp_path: Path, fake_vllm: HTTPServer) -> None:
    fake_vllm.expect_request("/v1/models").respond_with_json(
        {"object": "list", "data": [{"id": "openai/gpt-oss-120b", "object": "model"}]})
    env = base_env(tmp_path, VLLM_BASE_URL=fake_vllm.url_for("/").rstrip("/"))
    code, report, _ = run_json(env)
    assert (code, report["models"]) == (0, [])
    assert report["checks"][0]["detail"].startswith("/v1/models serves 'openai/gpt-oss-120b'")  # type: ignore[index]
    gone = base_env(tmp_path, VLLM_BASE_URL=f"http://127.0.0.1:{free_port()}")
    code, report, _ = run_json(gone)
    assert (code, report["failed_step"]) == (diagnostic.EXIT_NOT_SERVING, "upstream")
    assert "/v1/models could not be read" in str(report["error"])


# --------------------------------------------------------------- launches --

def test_launch_streams_the_log_with_elapsed_times_and_reports_time_to_healthy(
        tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), FAKE_VLLM_HEALTHY_AFTER="0.5")
    done = run(env, "--launch", "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    link = tmp_path / "hf" / ".links" / "tiny-model"
    assert link.resolve() == folder.resolve(), "the model goes through the worker's link"
    assert f"--model {link} " in done.stdout
    lines = [line for line in done.stdout.splitlines() if "fake vllm: api server" in line]
    assert len(lines) == 1 and lines[0].startswith("[") and "s] INFO fake vllm" in lines[0]
    healthy = [line for line in done.stdout.splitlines() if "healthy after" in line]
    seconds = float(healthy[0].split("healthy after ")[1].split(" s")[0])
    assert 0.5 <= seconds < 30
    assert "/v1/models serves 'tiny-model'" in healthy[0]
    assert_vllm_stopped(tmp_path)


def test_a_vllm_that_dies_while_starting_fails_with_its_last_lines(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), FAKE_VLLM_EXIT_AFTER="0",
                   FAKE_VLLM_EXIT_CODE="3")
    code, report, log = run_json(env, "--launch")
    assert (code, report["failed_step"]) == (diagnostic.EXIT_VLLM_EXITED, "launch")
    assert report["error"] == "vLLM for tiny-model exited with code 3 during start-up"
    launch = report["launch"]
    assert launch["healthy"] is False and launch["exit"] == "exited with code 3"  # type: ignore
    assert launch["last_lines"][-1] == "RuntimeError: simulated start-up failure (exit code 3)"  # type: ignore
    assert "RuntimeError: simulated start-up failure" in log, "the log streams to stderr"


def test_the_timeout_bounds_the_launch_and_vllm_is_stopped(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), FAKE_VLLM_NEVER_HEALTHY="1")
    started = time.monotonic()
    code, report, _ = run_json(env, "--launch", "--timeout", "1")
    assert time.monotonic() - started < 20
    assert (code, report["error"]) == (diagnostic.EXIT_TIMEOUT,
                                       "vLLM for tiny-model was not healthy after 1 s")
    assert any("503" in line for line in report["launch"]["last_lines"])  # type: ignore[index]
    assert_vllm_stopped(tmp_path)


def test_sigterm_during_a_launch_stops_vllm(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), FAKE_VLLM_NEVER_HEALTHY="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--launch", "--timeout", "120"],
                            env=env, cwd=PROJECT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "vllm.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "vLLM was not started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert_vllm_stopped(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_several_models_are_each_located_checked_and_launched(tmp_path: Path) -> None:
    first, second = model_folder(tmp_path / "alpha"), model_folder(tmp_path / "beta")
    env = base_env(tmp_path, MODEL_NAMES=f"{first};{second}", VLLM_PORT=str(free_port(2)))
    del env["FAKE_VLLM_PID_FILE"]  # one file for two stand-ins would race
    code, report, _ = run_json(env, "--launch", "--timeout", "30")
    assert code == 0, report
    models = report["models"]  # type: ignore[union-attr]
    assert [m["served_model_name"] for m in models] == [str(first), str(second)]
    ports = [m["command"][m["command"].index("--port") + 1] for m in models]
    assert ports == [env["VLLM_PORT"], str(int(env["VLLM_PORT"]) + 1)]
    names = [c["name"] for c in report["checks"]]  # type: ignore[union-attr]
    assert f"port ({first})" in names and f"port ({second})" in names
    assert report["launch"]["healthy"] is True  # type: ignore[index]
    assert len(report["launch"]["models"]) == 2  # type: ignore[index]


def test_secrets_never_appear_in_the_output(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "tiny-model")
    env = base_env(tmp_path, MODEL_PATH=str(folder), HF_TOKEN=HF_TOKEN,
                   VLLM_EXTRA_ARGS=f"--api-key {API_KEY} --hf-token={FLAG_TOKEN} --seed 1",
                   FAKE_VLLM_PRINT_ENV="HF_TOKEN")
    text = run(env, "--launch", "--timeout", "30")
    as_json = run(env, "--launch", "--timeout", "30", "--json")
    for done in (text, as_json):
        assert done.returncode == 0, done.stdout + done.stderr
        everything = done.stdout + done.stderr
        for secret in (HF_TOKEN, API_KEY, FLAG_TOKEN):
            assert secret not in everything
        assert "environment HF_TOKEN=***" in everything, "the secret vLLM printed is masked"
    report = json.loads(as_json.stdout)
    assert "--api-key ***" in report["models"][0]["command_line"].replace("'", "")
    assert {"name": "HF_TOKEN", "value": "***", "source": "set"} in report["settings"]
    assert any(c["name"] == "api-key" and c["status"] == "warn" for c in report["checks"])


# ---------------------------------------------------------- pure functions --

def test_models_answer_is_judged_against_the_served_name() -> None:
    body = json.dumps({"object": "list", "data": [{"id": "gpt-oss-20b"}]})
    assert diagnostic.judge_models(200, body, "gpt-oss-20b").status == "ok"
    wrong = diagnostic.judge_models(200, body, "openai/gpt-oss-20b")
    assert wrong.status == "fail" and "not 'openai/gpt-oss-20b'" in wrong.detail
    assert "--api-key" in diagnostic.judge_models(401, "{}", "m").detail
    assert diagnostic.judge_models(500, "Internal Server Error", "m").status == "fail"


def test_setting_names_are_every_variable_the_worker_reads() -> None:
    names = diagnostic.setting_names()
    assert set(DEFAULTS) <= set(names)
    for optional in ("MODEL_PATH", "VLLM_EXTRA_ARGS", "TOOL_CALL_PARSER", "HF_HUB_CACHE",
                     "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "LOCAL_API_KEY"):
        assert optional in names
    assert len(names) == len(set(names))


def test_secret_settings_and_secret_flag_values_are_hidden() -> None:
    rows = diagnostic.describe_settings({"LOCAL_API_KEY": "k3y-value", "MODEL_NAME": "org/m"})
    assert {"name": "LOCAL_API_KEY", "value": "***", "source": "set"} in rows
    assert {"name": "MODEL_NAME", "value": "org/m", "source": "set"} in rows
    assert secret_flag_values(["--api-key", "sk-1", "--hf-token=hf_2", "--seed", "3"]
                              ) == ["sk-1", "hf_2"]
    assert secret_values({"VLLM_EXTRA_ARGS": "--x 'unclosed"}) == ()


def test_the_real_cpu_build_loads_and_its_console_script_does_not() -> None:
    vllm_python = PROJECT / ".venv-vllm" / "bin" / "python"
    if not vllm_python.exists():
        pytest.fail(f"{vllm_python} is missing: `make test` installs vLLM's CPU build")
    env = {"PATH": f"{vllm_python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "HOME": os.environ.get("HOME", "/tmp")}
    legacy = preflight.check_vllm(load({"VLLM_PYTHON": str(vllm_python)}), env)
    assert legacy.status == "ok" and legacy.detail.endswith("loads vLLM 0.32.0"), legacy
    serve = preflight.check_vllm(load({"USE_VLLM_SERVE": "true"}), env)
    assert serve.status == "fail" and "PackageNotFoundError" in serve.detail, serve


def test_each_vllm_flag_is_shown_with_the_variable_it_came_from(tmp_path: Path) -> None:
    """As the README promises: which variable set each flag, what was ignored or renamed,
    and every warning; and an ordinary value (DEFAULT_MAX_TOKENS) is never masked."""
    config = tmp_path / "vllm.yaml"
    config.write_text("max-num-seqs: 16\nblock-size: 32\n")
    env = base_env(tmp_path, MODEL_PATH=str(model_folder(tmp_path / "hf" / "tiny-model")),
                   MAX_NUM_SEQS="64", ENABLE_PREFIX_CACHING="false", DEVICE="auto",
                   MODEL_REVISION="v2", ENABLE_PREFIX_CACHNG="true",
                   VLLM_CONFIG_FILE=str(config), DEFAULT_MAX_TOKENS="2048",
                   MAX_MODEL_LEN="2048")
    code, report, _ = run_json(env, "--locate-only")
    assert code == 0, report
    flags = {f["flag"]: f for f in report["flags"] if f["in"] == "command line"}
    in_file = {f["flag"]: f for f in report["flags"] if f["in"] == "config file"}
    assert flags["--max-num-seqs"] == {"flag": "--max-num-seqs", "argv": "--max-num-seqs 64",
                                       "source": "MAX_NUM_SEQS", "in": "command line"}
    assert flags["--enable-prefix-caching"]["argv"] == "--no-enable-prefix-caching"
    assert flags["--revision"]["source"] == "MODEL_REVISION"
    assert in_file["--max-num-seqs"]["argv"] == "--max-num-seqs 16", "shown, and overridden"
    assert in_file["--block-size"] == {"flag": "--block-size", "argv": "--block-size 32",
                                     "source": f"{config} (block-size)", "in": "config file"}
    assert any(n.startswith("DEVICE is ignored") for n in report["notes"])
    assert any("did you mean ENABLE_PREFIX_CACHING?" in w for w in report["warnings"])
    assert any("MAX_NUM_SEQS, which wins" in w for w in report["warnings"])
    command = report["models"][0]["command"]
    assert command[command.index("--max-num-seqs") + 1] == "64"
    assert command[command.index("--max-model-len") + 1] == "2048", "not masked"
    assert {"name": "DEFAULT_MAX_TOKENS", "value": "2048", "source": "set"} in report["settings"]


def test_a_bad_flag_value_fails_at_the_settings_step_naming_the_variable(
        tmp_path: Path) -> None:
    code, report, _ = run_json(base_env(tmp_path, KV_CACHE_DTYPE="fp9"))
    assert (code, report["failed_step"]) == (2, "settings")
    assert report["error"].startswith("KV_CACHE_DTYPE='fp9' is not valid for --kv-cache-dtype")


def test_a_model_to_download_is_described_before_anything_starts(tmp_path: Path) -> None:
    """What the worker would fetch and how big it is, read from the Hub; nothing fetched
    but the weights' index (the plan needs it), and a gated model's verdict at once."""
    root = tmp_path / "hub-root" / "hub-org" / "big"
    root.mkdir(parents=True)
    config = json.dumps({"model_type": "llama"})
    (root / "config.json").write_text(config)
    (root / "model.safetensors").write_bytes(b"\0" * 4096)
    (root / "pytorch_model.bin").write_bytes(b"\0" * 8192)
    with Hub(tmp_path / "hub-root") as hub:
        code, report, _ = run_json(base_env(tmp_path, MODEL_NAME="hub-org/big",
                                            HF_ENDPOINT=hub.url))
        served = hub.stats()["served"]
        (tmp_path / "hub-root" / "hub-org" / "big.hub.json").write_text('{"gated": true}')
        gated_code, gated, _ = run_json(base_env(tmp_path, MODEL_NAME="hub-org/big",
                                                 HF_ENDPOINT=hub.url))
    assert code == diagnostic.EXIT_OK, report["error"]
    download = report["downloads"][0]  # type: ignore[index]
    assert download["model"] == "hub-org/big"
    assert download["to_download_bytes"] == 4096 + len(config)
    assert {f["name"] for f in download["files"]} == {"config.json", "model.safetensors"}
    assert not any(key.endswith((".safetensors", ".bin")) for key in served), "no weights"
    assert (gated_code, gated["failed_step"]) == (diagnostic.EXIT_MODEL, "model")
    assert "HF_TOKEN" in str(gated["error"])
    assert gated["verdict"]["permanent"] is True  # type: ignore[index]
