"""What a model's own files say about it, read once at start.

`read_model_info` never raises: a missing or odd file just leaves a field
empty, and callers fall back to the name. The fields decide the tool-call and
reasoning parsers (parser_choice.py), whether the model generates text at all, and
the context length vLLM can be given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_GENERATIVE = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class ModelInfo:
    """A model's name, config.json `model_type` and `architectures`, chat template, and
    the longest context its files allow (config.json, or sentence-transformers'
    `max_seq_length`, as vLLM reads them; None when unknown or stretched by RoPE scaling)."""

    name: str
    model_type: str = ""
    chat_template: str = ""
    architectures: tuple[str, ...] = field(default=())
    max_positions: int | None = None

    @property
    def generative(self) -> bool:
        """False for embedding, reranking and classification models (BertModel, ...)."""
        return not self.architectures or any(a.endswith(_GENERATIVE) for a in self.architectures)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _max_positions(config: dict[str, Any]) -> int | None:
    for part in (config, config.get("text_config") or {}):
        if not isinstance(part, dict) or part.get("rope_scaling"):
            return None
        for key in _LENGTH_KEYS:
            if isinstance(part.get(key), int) and part[key] > 0:
                return int(part[key])
    return None


def _chat_template(path: Path) -> str:
    try:
        return (path / "chat_template.jinja").read_text()
    except OSError:
        found = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(found, list):  # named templates: [{"name", "template"}, ...]
        found = " ".join(str(t.get("template", "")) for t in found if isinstance(t, dict))
    return found if isinstance(found, str) else ""


def read_model_info(name: str, folder: str | None) -> ModelInfo:
    """ModelInfo from a local model folder; only the name when the model is not on disk."""
    if folder is None:
        return ModelInfo(name)
    path = Path(folder)
    config = _read_json(path / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = str(config.get("model_type") or text_config.get("model_type") or "")
    architectures = config.get("architectures")
    limits = [_max_positions(config),
              _read_json(path / "sentence_bert_config.json").get("max_seq_length")]
    known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return ModelInfo(
        name, model_type, _chat_template(path),
        tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
        min(known) if known else None)
