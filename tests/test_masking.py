"""Secrets: which values are secret, and that they are masked in text, argv and logs."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from worker.launch.command import build_command
from worker.masking import (
    SECRET_FLAG,
    MaskSecrets,
    is_secret_name,
    mask,
    mask_argv,
    secret_flag_values,
    secret_values,
    setup_logging,
    show,
)
from worker.settings.loader import load


def test_secrets_in_extra_args_are_masked_when_shown() -> None:
    settings = load({"VLLM_EXTRA_ARGS": "--api-key sk-live-1234 --hf-token=hf_abcdef --seed 3",
                     "OTHER_SECRET": "topsecret99"})
    argv = build_command(settings, settings.models[0], "m", 1) + ["--note", "uses topsecret99"]
    shown = show(argv, settings.secrets)
    assert "sk-live-1234" not in shown and "hf_abcdef" not in shown
    assert "topsecret99" not in shown
    assert "--api-key '***'" in shown and "'--hf-token=***'" in shown and "--seed 3" in shown
    assert mask_argv(["--api-key"]) == ["--api-key"]


def test_secret_names_and_secret_flag_values_are_collected() -> None:
    assert secret_flag_values(["--api-key", "sk-1", "--hf-token=hf_2", "--seed", "3"]
                              ) == ["sk-1", "hf_2"]
    assert secret_values({"VLLM_EXTRA_ARGS": "--x 'unclosed"}) == ()
    found = secret_values({"HF_TOKEN": "hf_abcdef", "VLLM_EXTRA_ARGS": "--api-key sk-longer-1",
                           "MODEL_NAME": "org/m", "X_KEY": "abc"})
    assert found == ("sk-longer-1", "hf_abcdef"), "longest first; too short to mask: left"


def test_mask_replaces_every_occurrence_and_nothing_else() -> None:
    assert mask("a hf_abcdef b hf_abcdef", ["hf_abcdef"]) == "a *** b ***"
    assert mask("nothing here", ["hf_abcdef", ""]) == "nothing here"


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_the_log_handler_masks_messages_arguments_and_tracebacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(["hf_abcdef123"])
    log = logging.getLogger("test.masking")
    log.info("token %s in an argument", "hf_abcdef123")
    try:
        raise RuntimeError("failed with hf_abcdef123")
    except RuntimeError:
        log.exception("and in a traceback")
    logged = stream.getvalue()
    assert "hf_abcdef123" not in logged
    assert "token *** in an argument" in logged and "RuntimeError: failed with ***" in logged
    assert any(isinstance(f, MaskSecrets) for f in logging.getLogger().handlers[0].filters)


def test_ordinary_settings_that_mention_tokens_or_keys_are_never_masked() -> None:
    env = {"DEFAULT_MAX_TOKENS": "2048", "MAX_NUM_BATCHED_TOKENS": "8192",
           "TOKENIZER": "org/tok", "TOKENIZER_MODE": "slow", "SSL_KEYFILE": "/k.pem",
           "VLLM_EXTRA_ARGS": "--max-num-batched-tokens 4096 --tokenizer-mode auto"}
    assert secret_values(env) == ()
    shown = show(["--max-num-batched-tokens", "4096", "--max-model-len", "2048"])
    assert shown == "--max-num-batched-tokens 4096 --max-model-len 2048"


def test_secret_names_are_recognised_precisely() -> None:
    secret = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LOCAL_API_KEY", "RUNPOD_AI_API_KEY",
              "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GCP_CREDENTIALS")
    ordinary = ("DEFAULT_MAX_TOKENS", "MAX_NUM_BATCHED_TOKENS", "TOKENIZER", "TOKENIZER_MODE",
                "SSL_KEYFILE", "KV_CACHE_DTYPE", "MAX_LOGPROBS")
    assert [n for n in secret if not is_secret_name(n)] == []
    assert [n for n in ordinary if is_secret_name(n)] == []
    assert [bool(SECRET_FLAG.match(f)) for f in ("--api-key", "--api-keys", "--hf-token",
                                                   "--max-num-batched-tokens", "--tokenizer")
            ] == [True, True, True, False, False]
