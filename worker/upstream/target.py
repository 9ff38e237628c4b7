"""Where one vLLM listens and what it serves: what the supervisor starts, the proxy sends
to, and the adapter loader adds adapters to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One vLLM server: the model name it serves, its URL, the routes it has (None: unknown),
    and the LoRA adapters it serves besides (by the names clients send as `model`)."""

    name: str
    base_url: str
    routes: frozenset[str] | None = None
    adapters: frozenset[str] = frozenset()

    def serves(self, model: object) -> bool:
        return model == self.name or model in self.adapters

    @property
    def pooling(self) -> bool:
        """An embedding, scoring or reranking model: one that does not generate text."""
        return self.routes is not None and "/v1/chat/completions" not in self.routes
