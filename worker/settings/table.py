"""Every setting the worker reads, declared once: name, default, how its value is read,
whether it is per model, worker-only or secret, and one line of doc.

The loader (loader.py), the README's settings table (`markdown_table`, kept equal by
a test), `.runpod/hub.json`'s check, the filter of vLLM's environment and the
diagnostic's "where each value came from" all read this table. Any `vllm serve` flag
is a setting too, by its own name (vllm_flags.py); the rows below are the ones the
worker reads itself. A reader takes the variable's name and its non-empty value and
returns the value, or raises SettingsError with a sentence naming both.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.settings.vllm_flags import FLAGS, FlagError, parse_bool

Reader = Callable[[str, str], Any]
AUTO = {"auto", "none"}  # worker-vllm's Hub form: "let vLLM decide"
OFF = {"false", "off", "none", "0"}


class SettingsError(ValueError):
    """A setting is invalid; the message names the variable and the accepted values."""


def _number(cast: Callable[[str], Any], rule: str, ok: Callable[[Any], bool]) -> Reader:
    def read(name: str, raw: str) -> Any:
        try:
            value = cast(raw)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise SettingsError(f"{name}={raw!r} is not valid: it must be {rule}.")
        return value
    return read


def _or_auto(read: Reader) -> Reader:
    """None (let vLLM decide) for auto/None, else `read`."""
    return lambda name, raw: None if raw.lower() in AUTO else read(name, raw)


def _size(raw: str) -> int | None:
    """A whole number as vLLM reads one: 8192, 32k (32,000), 32K (32,768)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", raw)
    if not match:
        return None
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    value = float(match.group(1)) * scale[match.group(2)]
    return int(value) if value == int(value) else None


def _text(name: str, raw: str) -> str:
    return raw


def _bool(name: str, raw: str) -> bool:
    try:
        return parse_bool(name, raw)
    except FlagError as exc:
        raise SettingsError(str(exc)) from None


def _switch(name: str, raw: str) -> bool | None:
    """True/False; None (pick for the model) for auto."""
    return None if raw.lower() == "auto" else _bool(name, raw)


def _parser(name: str, raw: str) -> str | None:
    """A parser name; None (pick one for the model) for auto; "" (off) for off/false/none.
    A blank Hub field arrives empty: that is unset, not off."""
    if raw.lower() == "auto":
        return None
    return "" if raw.lower() in OFF else raw


def _choice(flag: str) -> Reader:
    """One of the pinned vLLM's choices for `flag`; None for auto (vLLM's own default)."""
    choices = FLAGS[flag].choices or ()

    def read(name: str, raw: str) -> str | None:
        if raw.lower() in AUTO:
            return None
        if raw not in choices:
            raise SettingsError(f"{name}={raw!r} is not valid: it must be one of "
                                f"{', '.join(choices)}.")
        return raw
    return read


def _url(name: str, raw: str) -> str:
    if not re.match(r"^https?://[^/\s]+", raw):
        raise SettingsError(f"{name}={raw!r} is not valid: it must be an http(s) URL.")
    return raw.rstrip("/")


def _args(name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise SettingsError(f"{name} cannot be split into arguments: {exc}.") from None


POSITIVE = _number(int, "a whole number above 0", lambda v: v > 0)
PORT = _number(int, "a TCP port between 1 and 65535", lambda v: 0 < v < 65536)
SECONDS = _number(float, "a number of seconds above 0", lambda v: 0 < v < math.inf)
FRACTION = _number(float, "a fraction in (0, 1]", lambda v: 0 < v <= 1)
CONTEXT = _or_auto(_number(_size, "a whole number of tokens above 0 (or 32k, 32K), or auto",
                           lambda v: v > 0))


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None  # as the variable would hold it; None: unset
    read: Reader
    doc: str
    shown_default: str | None = None  # the README's, when "unset" has a meaning
    per_model: bool = False  # one value, or one per model separated by ';'
    worker_only: bool = False  # kept out of vLLM's environment
    secret: bool = False


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("MODEL_NAME", "openai/gpt-oss-120b", _text,
      "Hugging Face repo id of the model (also the served name)."),
    S("MODEL_PATH", None, _text, "A local folder to serve instead of searching."),
    S("MODEL_NAMES", None, _text, "Several models, separated by `;`, one vLLM each (see "
      '"Embeddings, reranking and several models").'),
    S("OPENAI_SERVED_MODEL_NAME_OVERRIDE", None, _text, "The `model` name clients use "
      "(default: `MODEL_NAME`, or the `MODEL_PATH` folder's name).", per_model=True),
    S("HF_HOME", "/runpod-volume/huggingface", _text, "Hugging Face home on the network "
      "volume: custom folders, `hub/` cache, downloads."),
    S("HF_HUB_CACHE", None, _text, "Another hub cache to search, and where a missing model is "
      "downloaded to."),
    S("HUGGINGFACE_HUB_CACHE", None, _text, "The same, by its older name."),
    S("BASE_PATH", None, _text, "worker-vllm's storage folder: its `huggingface-cache/hub` "
      "is searched first and, unless `HF_HUB_CACHE` is set, downloads go there."),
    S("HF_TOKEN", None, _text, "For gated or private models: the worker's download uses it, "
      "and vLLM gets it in its environment; never logged.", secret=True),
    S("GPU_MEMORY_UTILIZATION", "0.95", FRACTION, "Fraction of GPU memory vLLM may use, in "
      "(0, 1]; with several models, split evenly, or one value per model.", per_model=True),
    S("MAX_MODEL_LEN", "8192", CONTEXT, "Context length (the model's own maximum when that is "
      "smaller and this is unset; `auto`: vLLM's choice); one value, or one per model.",
      per_model=True),
    S("DTYPE", "bfloat16", _choice("--dtype"), "Weights' dtype (`auto`: vLLM's choice)."),
    S("TENSOR_PARALLEL_SIZE", None, _or_auto(POSITIVE), "GPUs to shard the model over.",
      shown_default="every visible GPU"),
    S("RUNNER", None, _choice("--runner"), "vLLM's `--runner`: `generate` or `pooling` "
      "(embedding, scoring, reranking); one value, or one per model.", "`auto`", per_model=True),
    S("CONVERT", None, _choice("--convert"), "vLLM's `--convert`, to serve a model as `embed` "
      "or `classify`; one value, or one per model.", "`auto`", per_model=True),
    S("ENABLE_AUTO_TOOL_CHOICE", None, _switch, "Let the model call tools when a request has "
      "`tools`: on whenever a tool-call parser is in use; `false` turns it off.", "auto"),
    S("TOOL_CALL_PARSER", None, _parser, "vLLM's tool-call parser: picked for the model's "
      'family (see "Tool calling and reasoning"), a name such as `openai`, `hermes`, '
      "`llama3_json`, or `off`.", "auto"),
    S("REASONING_PARSER", None, _parser, "vLLM's reasoning parser: picked for the model's "
      "family, a name such as `openai_gptoss`, `qwen3`, `deepseek_r1`, or `off`.", "auto"),
    S("COMPILE_CACHE_ON_VOLUME", "true", _bool, "Keep vLLM's compile cache on the network "
      "volume (a folder per model beside `HF_HOME`), so a new worker skips most of the "
      'compile; `false`: on the container disk, as vLLM does (see "Cold start").'),
    S("VLLM_CACHE_ROOT", None, _text, "vLLM's own cache folder; when set, the worker leaves "
      "the compile cache there."),
    S("ENABLE_LORA", None, _switch, "Serve LoRA adapters (vLLM's `--enable-lora`); on by itself "
      'when `LORA_MODULES` or `LORA_DIR` is set (see "LoRA adapters").', "auto"),
    S("LORA_MODULES", None, _text, "Adapters to serve: a JSON list of "
      '`{"name", "path", "base_model_name"}`, or `name=path` items; each path a folder, a '
      "folder under `HF_HOME` or a repo id in the Hugging Face cache."),
    S("LORA_DIR", None, _text, "A folder with one adapter folder each, loaded the first time "
      "a request names it."),
    S("MAX_LORA_RANK", None, _or_auto(_choice("--max-lora-rank")), "The largest adapter rank "
      "vLLM makes room for.", "the largest adapter's, at least 16"),
    S("VLLM_EXTRA_ARGS", None, _args, "More `vllm serve` flags, appended last (split like a "
      "shell would, never run by one; `--host` is refused: vLLM stays on 127.0.0.1).",
      worker_only=True),
    S("VLLM_PORT", "8000", PORT, "vLLM's port on 127.0.0.1 (the next ones for more models).",
      worker_only=True),
    S("USE_VLLM_SERVE", "false", _bool, "`true`: start `vllm serve`; `false`: "
      "`$VLLM_PYTHON -m vllm.entrypoints.openai.api_server`."),
    S("VLLM_PYTHON", "python3", _text, "The Python that has vLLM (the worker may live in "
      "another environment).", worker_only=True),
    S("VLLM_BASE_URL", None, _url, "Use a vLLM server that is already running instead of "
      "starting one.", worker_only=True),
    S("VLLM_STARTUP_TIMEOUT", "1800", SECONDS, "Seconds vLLM may take to become healthy "
      "(large models on a network volume need many minutes).", worker_only=True),
    S("FAILED_START_SECONDS", "180", _number(float, "a number of seconds of at least 0",
                                             lambda v: 0 <= v < math.inf),
      "When start-up fails for a reason a restart cannot fix (a setting, the model, a gated "
      "repository, too little memory for the context), seconds the worker answers every job "
      "and request with that reason before it exits (`0`: exit at once).", worker_only=True),
    S("MAX_CONCURRENCY", "30", POSITIVE, "Jobs one worker runs at once (vLLM batches them)."),
    S("REQUEST_TIMEOUT", "600", SECONDS, "Seconds vLLM may stay silent: the whole answer of "
      "a non-streaming request, the gap between two events of a stream."),
    S("DEFAULT_MAX_TOKENS", "512", POSITIVE, "`max_tokens` for plain `prompt` jobs that give "
      "none (vLLM's own default is 16)."),
    S("STREAM_FLUSH_INTERVAL", "0.05", _number(float, "a number of seconds from 0 to 0.1",
                                                lambda v: 0 <= v <= 0.1),
      "Seconds between two stream yields at most once the first output is out (0 to 0.1)."),
    S("DEFAULT_BATCH_SIZE", None, POSITIVE, "worker-vllm's stream batching: once this many "
      "events wait, they are yielded without waiting for the interval (the maximum)."),
    S("DEFAULT_MIN_BATCH_SIZE", None, POSITIVE, "The batch size a stream starts at."),
    S("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", None,
      _number(float, "a number of at least 1", lambda v: 1 <= v < math.inf),
      "How much the batch size grows after each yield.", "`3`"),
    S("SHUTDOWN_GRACE_PERIOD", "30", _number(float, "a number of seconds of at least 0",
                                              lambda v: 0 <= v < math.inf),
      "Seconds work in flight gets after SIGTERM, in total, before vLLM is stopped."),
    S("LOCAL_API_KEY", None, _text, "Local endpoint only: when set, every request needs "
      "`Authorization: Bearer <key>`.", worker_only=True, secret=True),
    S("LOCAL_MAX_BODY_MB", "20", _number(float, "a number of MB above 0",
                                         lambda v: 0 < v <= 1024),
      "The largest request body the local endpoint and the load-balancing server accept.",
      worker_only=True),
    S("PORT", None, PORT, "Load-balancing endpoints: the port the worker serves the OpenAI API "
      "on, on every interface; set, with no job queue (`RUNPOD_WEBHOOK_GET_JOB` unset), it "
      'makes the worker that server (see "Load-balancing endpoints").', worker_only=True),
    S("PORT_HEALTH", None, PORT, "Load-balancing endpoints: the port of `GET /ping`.",
      "`PORT`", worker_only=True),
    S("API_KEY", None, _text, "Load-balancing mode: when set, every request but `/ping` needs "
      "`Authorization: Bearer <key>` (for the image run outside Runpod, which checks its own "
      "key).", worker_only=True, secret=True),
)
BY_NAME = {s.name: s for s in SETTINGS}


def markdown_table() -> str:
    """The README's settings table, from the rows above."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = s.shown_default or (f"`{s.default}`" if s.default is not None else "")
        rows.append(f"| `{s.name}` | {default} | {s.doc} |")
    return "\n".join(rows)
