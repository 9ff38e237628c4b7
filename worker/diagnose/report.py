"""The start-up diagnostic: why would the worker's start-up fail here?

    python test_vllm_command.py [--launch] [--timeout SECONDS] [--json] [--locate-only]

(that file, whose name worker-vllm's users know, only calls `main` here). It reads
the environment the worker reads and decides with the worker's own code
(the settings loader, the launch plan: the locator, the parser choice and the
command builder; the supervisor's VllmChild and wait_healthy), so it reports what the
worker does:
1. settings: each variable the worker reads, its value and whether it was set;
2. models: for each model, each place searched and why it was skipped, the folder (or
   hub id) chosen, the parsers picked, the name clients send as `model`, and the exact
   vLLM command line;
3. checks: vLLM's interpreter (or executable) exists and imports vLLM, GPUs seen, free
   disk in HF_HOME, memory against the weights' size, the ports are free;
4. launch (--launch only): starts vLLM as the worker does, streams its log with the
   elapsed time, waits for /health (at most --timeout, by default VLLM_STARTUP_TIMEOUT),
   asks /v1/models for the served name, reports where the start-up time went (weights,
   compile and its cache, graph capture, KV cache, engine init), then stops vLLM's group.

Exit codes name the failed step: 0 none (warnings allowed), 2 settings, 3 model, 4 a
check, 5 vLLM exited while starting, 6 vLLM not healthy in time, 7 healthy but not
serving the expected name; 1 is a crash of this script. Without --launch nothing is
started, and the only thing written is what the worker writes at every start: the link
to the weights in HF_HOME. Secrets (values of variables named like *TOKEN*, *KEY*, *SECRET*,
*PASSWORD*, and of secret flags in VLLM_EXTRA_ARGS) are masked in all output, JSON
included. With --json, stdout is one JSON object and vLLM's log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

import httpx

from model_locator import LocatorError
from worker.diagnose.preflight import Check, run_checks
from worker.launch import weights
from worker.launch.command import count_gpus
from worker.launch.plan import Launch, plan_launches
from worker.masking import MASK, is_secret_name, mask, mask_argv, secret_values, show
from worker.settings.loader import Settings, SettingsError, load
from worker.settings.table import SETTINGS, Setting
from worker.upstream.child import QUOTED_LINES, VllmChild
from worker.upstream.supervisor import StartupError, facts_of, wait_healthy
from worker.upstream.timeline import Timeline
from worker.upstream.verdicts import judge

if TYPE_CHECKING:
    from worker.launch.download import DownloadPlan

EXIT_OK, EXIT_SETTINGS, EXIT_MODEL, EXIT_CHECK = 0, 2, 3, 4
EXIT_VLLM_EXITED, EXIT_TIMEOUT, EXIT_NOT_SERVING = 5, 6, 7


def setting_names() -> tuple[str, ...]:
    """Every variable the worker reads as its own setting, as settings_table declares them."""
    return tuple(s.name for s in SETTINGS)


def describe_settings(env: Mapping[str, str]) -> list[dict[str, str]]:
    """Each setting that has a value, and its source; secret values are never shown."""
    rows = []
    for setting in (*SETTINGS, Setting("HF_HUB_OFFLINE", None, str, "")):
        given = (env.get(setting.name) or "").strip()
        if given:
            hidden = setting.secret or is_secret_name(setting.name)
            rows.append({"name": setting.name, "value": MASK if hidden else given,
                         "source": "set"})
        elif setting.default is not None:
            rows.append({"name": setting.name, "value": setting.default, "source": "default"})
    return rows


def describe_flags(settings: Settings) -> list[dict[str, str]]:
    """Each vLLM flag a variable (or the config file) sets, and where it came from."""
    return [{"flag": arg.flag, "argv": " ".join(arg.argv), "source": arg.source,
             "in": "command line" if arg in settings.flag_args else "config file"}
            for arg in (*settings.flag_args, *settings.config_args)]


def judge_models(status: int, body: str, served: str) -> Check:
    """Does /v1/models list the name the worker sends (and clients must send) as `model`?"""
    if status == 401:
        return Check("models", "fail", "/v1/models answered 401: vLLM wants an API key the "
                                       "worker does not know; give it as --api-key in "
                                       "VLLM_EXTRA_ARGS, where the worker reads it")
    try:
        ids = [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return Check("models", "fail", f"/v1/models answered {status}: {body[:200]}")
    if served not in ids:
        return Check("models", "fail", f"/v1/models lists {ids}, not {served!r}")
    return Check("models", "ok", f"/v1/models serves {served!r}: clients send it as `model`")


def probe_models(base_url: str, served: str, api_key: str | None = None) -> Check:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{base_url}/v1/models", timeout=10, headers=headers)
    except httpx.HTTPError as exc:
        return Check("models", "fail", f"/v1/models could not be read: {exc}")
    return judge_models(answer.status_code, answer.text, served)


# ------------------------------------------------------------------ report --

def _masked(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, dict):
        return {k: _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    return value


class Report:
    """What the run found: printed step by step, or kept for one JSON object at the end."""

    def __init__(self, out: TextIO, log_out: TextIO, as_json: bool) -> None:
        self.out, self.log_out, self.as_json = out, log_out, as_json
        self.secrets: list[str] = []
        self.data: dict[str, Any] = {
            "ok": True, "exit_code": EXIT_OK, "failed_step": None, "error": None,
            "settings": [], "flags": [], "notes": [], "warnings": [], "models": [],
            "checks": [], "downloads": [], "launch": None, "verdict": None}

    def say(self, text: str) -> None:
        if not self.as_json:
            print(mask(text, self.secrets), file=self.out, flush=True)

    def log(self, text: str) -> None:
        print(mask(text, self.secrets), file=self.log_out, flush=True)

    def settings(self, settings: Settings, flags: list[dict[str, str]]) -> None:
        """The vLLM flags variables set, the notes and the warnings of the settings."""
        self.data.update(flags=flags, notes=list(settings.notes),
                         warnings=list(settings.warnings))
        for flag in flags:
            self.say(f"  {flag['argv']}  (from {flag['source']}, {flag['in']})")
        for note in settings.notes:
            self.say(f"  note: {note}")
        for warning in settings.warnings:
            self.say(f"  warn: {warning}")

    def check(self, check: Check) -> None:
        self.data["checks"].append(asdict(check))
        self.say(f"  {check.status:<5} {check.name}: {check.detail}")

    def download(self, planned: DownloadPlan) -> None:
        """What the worker would download before vLLM starts, and how big it is."""
        self.data["downloads"].append({
            "model": planned.repo_id, "revision": planned.revision, "commit": planned.commit,
            "cache": planned.cache_dir, "weights": planned.weights,
            "total_bytes": planned.total_bytes, "in_cache_bytes": planned.present_bytes,
            "to_download_bytes": planned.missing_bytes,
            "files": [{"name": f.name, "bytes": f.size, "in_cache": f.present}
                      for f in planned.files]})
        lines = planned.describe()
        self.say(f"  would download {lines[0]}\n" + "\n".join(f"  {x}" for x in lines[1:]))

    def model(self, launch: Launch) -> None:
        found = launch.location
        served = launch.model.served_name
        self.data["models"].append({
            "served_model_name": served, "searched": list(found.steps),
            "chosen": found.model, "is_local": found.is_local, "weights": launch.weights,
            "parsers": list(launch.parsers.reasons), "compile_cache": launch.cache,
            "adapters": [{"name": a.name, "path": a.path, "base": a.base, "rank": a.rank,
                          "found": a.found} for a in launch.adapters],
            "command": mask_argv(launch.argv, self.secrets),
            "command_line": show(launch.argv, self.secrets)})
        self.say("\n".join(f"  - {step}" for step in launch.reasons))
        self.say(f"  chosen: {found.model}{'' if found.is_local else ' (from the hub)'}\n"
                 f"  served model name (clients send it as `model`): {served}\n"
                 f"  vLLM command:\n    {show(launch.argv, self.secrets)}")

    def finish(self, code: int, step: str | None = None, error: str | None = None) -> int:
        self.data.update(ok=code == EXIT_OK, exit_code=code, failed_step=step, error=error)
        if error and step in ("settings", "model") and self.data["verdict"] is None:
            # the worker's own checks: a sentence already, and no restart changes a setting
            self.data["verdict"] = {"cause": "setting" if step == "settings" else "model",
                                    "sentence": error, "permanent": True}
        if self.as_json:
            print(json.dumps(_masked(self.data, self.secrets), indent=2), file=self.out)
        elif error:
            self.say(f"\nFAILED at step '{step}' (exit code {code}): {error}")
        else:
            self.say("\nResult: ok (exit code 0)")
        return code


class _Elapsed(logging.Handler):
    """vLLM's lines (and the supervisor's notes) with the seconds since launch."""

    def __init__(self, report: Report, started: float) -> None:
        super().__init__(logging.INFO)
        self.report, self.started = report, started

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage().removeprefix("[vllm] ")
        self.report.log(f"[{record.created - self.started:7.1f}s] {line}")


# ------------------------------------------------------------------- steps --

def launch(launches: Sequence[Launch], timeout: float, api_key: str | None,
           report: Report) -> int:
    """Start every vLLM as the worker does, wait for health, ask for the models, stop them."""
    started = time.time()
    handler, root = _Elapsed(report, started), logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    timelines = [Timeline(x.model.served_name, x.weights_bytes, x.located_in)
                 for x in launches]
    children = [(x, VllmChild(x.argv, x.env, on_line=t.feed))
                for x, t in zip(launches, timelines, strict=True)]
    result: dict[str, Any] = {"healthy": False, "seconds": None, "model": None, "exit": None,
                              "last_lines": [], "models": [], "timeline": []}
    report.data["launch"] = result
    outcome: tuple[int, str | None, str | None] = (EXIT_OK, None, None)
    try:
        for _, child in children:
            child.start()
        for (planned, child), timeline in zip(children, timelines, strict=True):
            url, served = f"http://127.0.0.1:{planned.model.port}", planned.model.served_name
            try:
                wait_healthy(url, max(started + timeout - time.time(), 0.1), child)
                timeline.mark_healthy()
            except StartupError:
                reason = child.exit_reason()
                result.update(model=served, exit=reason, last_lines=child.tail(QUOTED_LINES))
                verdict = judge(child.tail(), facts_of(planned))
                if verdict is not None:
                    report.data["verdict"] = asdict(verdict)
                if reason:
                    what = f"vLLM for {served} {reason} during start-up"
                    outcome = (EXIT_VLLM_EXITED, "launch",
                               f"{what}: {verdict.sentence}" if verdict else what)
                else:
                    outcome = (EXIT_TIMEOUT, "launch",
                               f"vLLM for {served} was not healthy after {timeout:g} s")
                break
            models = probe_models(url, served, api_key)
            result["models"].append(models.detail)
            report.data["checks"].append(asdict(models))
            if models.status == "fail":
                outcome = (EXIT_NOT_SERVING, "launch", models.detail)
                break
        else:
            result.update(healthy=True, seconds=round(time.time() - started, 1))
    finally:
        result["seconds"] = result["seconds"] or round(time.time() - started, 1)
        result["timeline"] = [{"model": t.name, **t.phases()} for t in timelines]
        for _, child in children:
            child.stop(grace=10)
        root.removeHandler(handler)
    if result["healthy"]:
        report.say(f"  healthy after {result['seconds']:.1f} s; " + "; ".join(result["models"]))
        for timeline in timelines:
            report.say(f"  {timeline.summary()}")
    elif result["last_lines"]:
        report.say("  its last lines:\n" + "\n".join(f"    {x}" for x in result["last_lines"]))
    return report.finish(*outcome)  # the verdict, if there is one, is the last line


def diagnose(args: argparse.Namespace, env: Mapping[str, str], report: Report) -> int:
    """The steps of the module docstring, in order; returns the exit code."""
    report.secrets = list(secret_values(env))
    report.say("1. Settings")
    report.data["settings"] = describe_settings(env)
    for row in report.data["settings"]:
        report.say(f"  {row['name']}={row['value']}  ({row['source']})")
    try:
        settings = load(env)
    except SettingsError as exc:
        return report.finish(EXIT_SETTINGS, "settings", str(exc))
    report.settings(settings, describe_flags(settings))
    if url := settings.vllm_base_url:  # the worker starts nothing: is that server serving?
        report.say(f"\n2. vLLM server\n  VLLM_BASE_URL is set: the worker starts no vLLM and "
                   f"sends every job to {url}")
        report.check(models := probe_models(settings.upstream_url, settings.served_model_name,
                                                  settings.vllm_api_key))
        failed = models.status == "fail"
        return report.finish(EXIT_NOT_SERVING if failed else EXIT_OK,
                             "upstream" if failed else None, models.detail if failed else None)
    report.say(f"\n2. Model{'s' if len(settings.models) > 1 else ''}")
    try:
        launches = plan_launches(settings, env)
    except LocatorError as exc:
        return report.finish(EXIT_MODEL, "model", str(exc))
    except SettingsError as exc:
        return report.finish(EXIT_SETTINGS, "settings", str(exc))
    for launch_plan in launches:
        report.model(launch_plan)
    if args.locate_only:
        return report.finish(EXIT_OK)
    for name in weights.missing(launches):  # what the worker would fetch before vLLM starts
        try:
            planned = weights.plan(settings, env, name)
        except LocatorError as exc:  # a DownloadError: gated, missing, offline, ...
            return report.finish(EXIT_MODEL, "model", str(exc))
        report.download(planned)
    report.say("\n3. Checks")
    checks = run_checks(settings, env, launches, count_gpus(env))
    for check in checks:
        report.check(check)
    if failed := next((c for c in checks if c.status == "fail"), None):
        return report.finish(EXIT_CHECK, "checks", f"{failed.name}: {failed.detail}")
    if not args.launch:
        report.say("\nNothing was started: --launch starts vLLM as shown above.")
        return report.finish(EXIT_OK)
    report.say("\n4. Launch")
    if names := weights.missing(launches):  # as the worker does: fetched first, then planned
        try:
            weights.fetch(settings, env, names)
        except LocatorError as exc:
            return report.finish(EXIT_MODEL, "model", str(exc))
        launches = plan_launches(settings, env)
    return launch(launches, args.timeout or settings.startup_timeout, settings.vllm_api_key,
                  report)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds above 0")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="test_vllm_command.py", description="Show, step by step, what the worker's "
        "start-up does here and what would make it fail.",
        epilog="exit codes: 0 ok, 1 crash, 2 settings (or a bad option), 3 model, 4 a check, "
               "5 vLLM exited while starting, 6 not healthy in time, 7 wrong or no model served")
    parser.add_argument("--launch", action="store_true", help="start vLLM with the command, "
                        "stream its log, report the time to healthy or the failure, stop it")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="how long --launch "
                        "waits for /health (default: VLLM_STARTUP_TIMEOUT)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--locate-only", action="store_true",
                        help="stop after the models and their commands")
    return parser.parse_args(argv)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through launch(), which stops vLLM's group


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ,
         out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    return diagnose(args, env, Report(out, sys.stderr if args.json else out, args.json))
