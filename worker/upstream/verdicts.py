"""Placeholder until the classifier lands: the interface only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Facts:
    """What the worker knows of the start that failed, to word a verdict in its settings."""

    model: str
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.92
    tensor_parallel_size: int | None = None
    gpus: int = 0
    port: int = 8000
    token_given: bool = False
    revision: str | None = None
    weights_bytes: int | None = None


@dataclass(frozen=True)
class Verdict:
    cause: str
    sentence: str
    permanent: bool


def judge(lines: Sequence[str], facts: Facts) -> Verdict | None:
    for line in lines:
        if "is greater than the derived max_model_len" in line:
            return Verdict("context-too-long", f"MAX_MODEL_LEN={facts.max_model_len} is too "
                           "long for the model: set MAX_MODEL_LEN lower.", True)
    return None
