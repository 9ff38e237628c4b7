"""Where one vLLM listens and what it serves: the names it answers to, its kind of model."""

from __future__ import annotations

from worker.upstream.target import Target


def test_a_target_serves_its_own_name_and_its_adapters_only() -> None:
    target = Target("base", "http://127.0.0.1:1", adapters=frozenset({"sql-lora"}))
    assert target.serves("base") and target.serves("sql-lora")
    assert not target.serves("other") and not target.serves(None)


def test_a_model_without_the_chat_route_is_a_pooling_model_and_unknown_routes_are_not() -> None:
    embedder = Target("e", "http://127.0.0.1:1", frozenset({"/v1/embeddings", "/v1/models"}))
    chat = Target("c", "http://127.0.0.1:1", frozenset({"/v1/chat/completions"}))
    assert embedder.pooling and not chat.pooling
    assert not Target("u", "http://127.0.0.1:1").pooling
