"""Which values are secret, and hiding them wherever text leaves the worker.

A value is secret when its variable's name says so (`HF_TOKEN`, `*_KEY`, ...) or
when it is given to a secret-looking flag in `VLLM_EXTRA_ARGS` (`--api-key V`,
`--hf-token=V`), which vLLM may print back. `mask` and `mask_argv` replace them
with `***`; `setup_logging` puts a filter on the one log handler that masks every
record, vLLM's lines and tracebacks included. Nothing else decides what is secret.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Mapping, Sequence

MASK = "***"
# Variables whose values must never be logged or returned: HF_TOKEN, *_API_KEY, *_KEY,
# *_TOKEN, *SECRET*, *PASSWORD*, *CREDENTIAL*. Precisely so: TOKEN or KEY inside a name
# is not enough (DEFAULT_MAX_TOKENS, MAX_NUM_BATCHED_TOKENS, TOKENIZER, SSL_KEYFILE are
# ordinary settings, and masking their values would hide every "2048" in every log line).
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY)$|SECRET|PASSW(OR)?D|CREDENTIAL", re.IGNORECASE)
SECRET_FLAG = re.compile(r"^--?([\w-]*-)?(token|keys?)$|^--?[\w-]*(secret|passw(or)?d)[\w-]*$",
                         re.IGNORECASE)
_SHORTEST = 4  # shorter values would mask ordinary text everywhere


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_flag_values(args: Sequence[str]) -> list[str]:
    """Values given to secret-looking flags: `--api-key VALUE`, `--hf-token=VALUE`."""
    values = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if SECRET_FLAG.match(flag):
            values.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return values


def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """Values never to print, longest first: every variable that looks like a secret
    and every secret flag's value in VLLM_EXTRA_ARGS."""
    try:
        extra = shlex.split(env.get("VLLM_EXTRA_ARGS") or "")
    except ValueError:  # settings.load refuses it
        extra = []
    found = {v for k, v in env.items() if is_secret_name(k)} | {*secret_flag_values(extra)}
    return tuple(sorted((v for v in found if len(v) >= _SHORTEST), key=len, reverse=True))


def mask(text: str, secrets: Sequence[str]) -> str:
    """`text` with every known secret value replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def mask_argv(argv: Sequence[str], secrets: Sequence[str] = ()) -> list[str]:
    """argv with the values of secret-looking flags and any known secret replaced by ***."""
    masked: list[str] = []
    hide_next = False
    for item in argv:
        if hide_next:
            masked.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = item.partition("=")
        if SECRET_FLAG.match(flag):
            if eq:
                masked.append(f"{flag}={MASK}")
                continue
            hide_next = True
        masked.append(mask(item, secrets))
    return masked


def show(argv: Sequence[str], secrets: Sequence[str] = ()) -> str:
    """A copy-pasteable, masked command line."""
    return shlex.join(mask_argv(argv, secrets))


class MaskSecrets(logging.Filter):
    """Masks every record that passes, its traceback included (one can quote a secret)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = mask(text, self.secrets)
        if masked != text:
            record.msg, record.args = masked, None
        if record.exc_info:
            record.exc_text = mask(logging.Formatter().formatException(record.exc_info),
                                   self.secrets)
            record.exc_info = None
        return True


def setup_logging(secrets: Sequence[str] = (), level: int = logging.INFO) -> None:
    """One stderr handler for the worker's and vLLM's lines, with secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
