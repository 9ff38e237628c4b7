"""Every `vllm serve` flag as an environment variable, checked before vLLM is spawned.

`--max-num-seqs` is set by `MAX_NUM_SEQS`: a value flag gets the value, a switch
(`--x`/`--no-x`) gets `--x` or `--no-x` from true or false, a bare flag is given
or left out. The flags, their kinds, types and choices are data (`vllm_flags.json`),
generated from the argument parser of the pinned vLLM (tools/gen_vllm_flags.py; a
test fails when the two disagree), so the worker never imports vLLM.

Besides: worker-vllm's historical names (`ALIASES`), its settings that no longer
mean anything (`RETIRED`: accepted, with one line saying what replaced them), and
names that never map (`OWNED`: the worker sets those flags itself, or the name
means something else in a container). `auto`, `None` and empty values mean "let
vLLM decide": the flag is left out. Everything here is pure.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "vllm_flags.json"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
UNSET = {"", "auto", "none"}
_SIZE = re.compile(r"\d+|\d+(\.\d+)?[kKmMgGtT]")

# worker-vllm's names that are not the flag's own -> the flag.
ALIASES = {"MODEL_REVISION": "--revision", "TOKENIZER_NAME": "--tokenizer",
           "CUSTOM_CHAT_TEMPLATE": "--chat-template", "VLLM_CONFIG_FILE": "--config",
           "OPENAI_RESPONSE_ROLE": "--response-role"}
# Names that never become flags: the worker sets the flag itself (where vLLM listens, what
# it serves, secrets it reads from the environment), or the name has another meaning in a
# container (torch.distributed's MASTER_*, a generic CONFIG or LOG_LEVEL). VLLM_EXTRA_ARGS
# still reaches the few that make sense there.
OWNED = frozenset({
    "HOST", "PORT", "MODEL", "SERVED_MODEL_NAME", "API_KEY", "HF_TOKEN", "UDS", "HEADLESS",
    "GRPC", "GRPC_PORT", "ROOT_PATH", "SSL_KEYFILE", "SSL_CERTFILE", "SSL_CA_CERTS",
    "SSL_CERT_REQS", "SSL_CIPHERS", "ENABLE_SSL_REFRESH", "HELP", "CONFIG", "LOG_LEVEL",
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES"})
# worker-vllm settings (and flags vLLM removed) that mean nothing now -> what to say.
RETIRED = {
    "RAW_OPENAI_OUTPUT": "ignored: streams are always vLLM's own server-sent events",
    "DEVICE": "ignored: vLLM picks the device itself (the flag is gone)",
    "SCHEDULER_DELAY_FACTOR": "ignored: vLLM removed --scheduler-delay-factor",
    "SWAP_SPACE": "ignored: vLLM's V1 engine has no swap space",
    "NUM_SCHEDULER_STEPS": "ignored: vLLM removed multi-step scheduling",
    "DISABLE_LOG_REQUESTS": "ignored: vLLM inverted it; set ENABLE_LOG_REQUESTS instead",
    "MAX_CONTEXT_LEN_TO_CAPTURE": "ignored: vLLM removed it",
    "ROPE_SCALING": "ignored: vLLM removed it; pass rope_scaling in HF_OVERRIDES",
    "ROPE_THETA": "ignored: vLLM removed it; pass rope_theta in HF_OVERRIDES",
    "TASK": "ignored: vLLM replaced --task; set RUNNER and CONVERT",
    "SPECULATIVE_METHOD": "ignored: give the whole SPECULATIVE_CONFIG as JSON",
    "SPECULATIVE_MODEL": "ignored: give the whole SPECULATIVE_CONFIG as JSON",
    "NUM_SPECULATIVE_TOKENS": "ignored: give the whole SPECULATIVE_CONFIG as JSON",
    "NGRAM_PROMPT_LOOKUP_MAX": "ignored: give the whole SPECULATIVE_CONFIG as JSON",
    "NGRAM_PROMPT_LOOKUP_MIN": "ignored: give the whole SPECULATIVE_CONFIG as JSON",
    "GUIDED_DECODING_BACKEND": "ignored: vLLM replaced it with STRUCTURED_OUTPUTS_CONFIG",
}
# Value flags whose 0 means "let vLLM decide" (worker-vllm templates carry a stray 0; vLLM
# refuses it). Not general: --seed 0 or --cpu-offload-gb 0 are real values.
ZERO_MEANS_UNSET = frozenset({"--max-num-batched-tokens"})


class FlagError(ValueError):
    """A value vLLM would refuse; the message names the variable and what is accepted."""


@dataclass(frozen=True)
class FlagArg:
    """A vLLM flag and its values, and the variable (or file) it came from."""

    flag: str
    argv: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Flag:
    flag: str
    kind: str  # "value", "switch" (--x / --no-x) or "flag" (bare, store-true)
    type: str | None
    several: bool
    choices: tuple[str, ...] | None

    @property
    def variable(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_").upper()


def _load() -> tuple[str, dict[str, Flag]]:
    data = json.loads(DATA.read_text())
    flags = {f["flag"]: Flag(f["flag"], f["kind"], f["type"], f["several"],
                             tuple(f["choices"]) if f["choices"] is not None else None)
             for f in data["flags"]}
    return data["vllm"], flags


VLLM_VERSION, FLAGS = _load()
BY_VARIABLE = {f.variable: f for f in FLAGS.values() if f.variable not in OWNED}


def parse_bool(variable: str, raw: str) -> bool:
    if raw.strip().lower() in TRUE:
        return True
    if raw.strip().lower() in FALSE:
        return False
    raise FlagError(f"{variable}={raw!r} is not valid: it must be true or false.")


def _check(flag: Flag, variable: str, item: str) -> None:
    """Raise FlagError when vLLM's parser would refuse `item` for `flag`."""
    rule = {"int": "a whole number", "float": "a number", "size": "a whole number (1k, 2M "
            "and 1K, 2M as vLLM reads them)", "size_or_auto": "a whole number or auto",
            "json": "a JSON object", "json_or_text": "text, or a JSON object"}.get(flag.type or "")
    ok = True
    try:
        if flag.type == "int":
            int(item)
        elif flag.type == "float":
            ok = math.isfinite(float(item))
        elif flag.type in ("size", "size_or_auto"):
            ok = bool(_SIZE.fullmatch(item)) or (flag.type == "size_or_auto" and item == "-1")
        elif flag.type == "json" or (flag.type == "json_or_text"
                                     and re.match(r"(?s)^\s*{.*}\s*$", item)):
            ok = isinstance(json.loads(item), dict)
    except ValueError:
        ok = False
    if not ok:
        raise FlagError(f"{variable}={item!r} is not valid for {flag.flag}: it must be {rule}.")
    if flag.choices is not None and item not in flag.choices:
        raise FlagError(f"{variable}={item!r} is not valid for {flag.flag}: it must be one of "
                        f"{', '.join(flag.choices)}.")


def flag_argv(flag: Flag, variable: str, raw: str) -> list[str]:
    """The argv items `variable=raw` gives vLLM ([] lets vLLM decide), or FlagError."""
    value = raw.strip()
    if value.lower() in UNSET or (flag.flag in ZERO_MEANS_UNSET and value == "0"):
        return []
    if flag.kind == "switch":
        on = parse_bool(variable, value)
        return [flag.flag if on else f"--no-{flag.flag.removeprefix('--')}"]
    if flag.kind == "flag":
        return [flag.flag] if parse_bool(variable, value) else []
    if flag.several:
        try:
            items = shlex.split(value)
        except ValueError as exc:
            raise FlagError(f"{variable} cannot be split into values: {exc}.") from None
    else:
        items = [value]
    for item in items:
        _check(flag, variable, item)
    return [flag.flag, *items]


def known_flag(arg: str) -> Flag | None:
    """The flag an argv item names (`--x`, `--no-x`, `--x=v`, or a prefix of one only, as
    argparse takes it), if vLLM has it."""
    name = arg.partition("=")[0]
    found = FLAGS.get(name)
    if found is None and name.startswith("--no-"):
        found = FLAGS.get("--" + name.removeprefix("--no-"))
        found = found if found is not None and found.kind == "switch" else None
    if found is None:
        prefixed = [f for f in FLAGS.values() if f.flag.startswith(name)]
        found = prefixed[0] if len(prefixed) == 1 else None
    return found
