"""What the output of each README example must look like (the examples run in
project/test_readme.py, and in e2e/test_models.py for those that need an embedding model)."""

from __future__ import annotations

import json
from collections.abc import Callable


def chat_completion(out: str) -> None:
    assert json.loads(out)["object"] == "chat.completion"


def chat_stream(out: str) -> None:
    events = [line for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def runsync(out: str) -> None:
    answer = json.loads(out)
    assert answer["status"] == "COMPLETED"
    assert answer["output"][0]["object"] == "chat.completion"


def printed_text(out: str) -> None:
    assert out.endswith("\n") and len(out) > 1


CHECKS: dict[str, Callable[[str], None]] = {
    "curl-chat": chat_completion,
    "curl-stream": chat_stream,
    "runsync": runsync,
    "runpod-client": printed_text,
    "openai-client": printed_text,
}


def embeddings_of_two(out: str) -> None:
    answer = json.loads(out)
    assert [len(item["embedding"]) for item in answer["data"]] == [384, 384]


def reranked_paris_first(out: str) -> None:
    results = json.loads(out)["output"][0]["results"]
    assert results[1]["document"] == "Paris is the capital of France."
    assert results[1]["relevance_score"] > results[0]["relevance_score"]


def two_lengths(out: str) -> None:
    assert out.strip() == "[384, 384]"


EMBEDDING_EXAMPLES: dict[str, Callable[[str], None]] = {
    "curl-embeddings": embeddings_of_two,
    "runsync-rerank": reranked_paris_first,
    "openai-embeddings": two_lengths,
}


def flags_by_variable(out: str) -> None:
    command = next(line for line in out.splitlines() if "--served-model-name" in line)
    for flag in ("--max-num-seqs 64", "--no-enable-prefix-caching", "--kv-cache-dtype fp8"):
        assert flag in command, flag
    assert "--max-num-seqs 64  (from MAX_NUM_SEQS, command line)" in out


def worker_vllm_names(out: str) -> None:
    command = next(line for line in out.splitlines() if "--served-model-name" in line)
    assert "--revision main" in command and "--tokenizer org/tokenizer" in command
    assert "--max-model-len" not in command, "auto: vLLM's choice"
    assert "note: DEVICE is ignored" in out
    assert "note: MODEL_REVISION is worker-vllm's name for REVISION" in out


def adapter_found(out: str) -> None:
    command = next(line for line in out.splitlines() if "--served-model-name" in line)
    assert "LoRA adapter support-bot: acme/support-bot-lora in the cache" in out
    assert "--enable-lora" in command and '--lora-modules \'{"name": "support-bot"' in command


# Run in the project's folder with MODEL_PATH set to a model folder and the adapter
# acme/support-bot-lora in HF_HOME's cache: no endpoint needed.
SETTINGS_EXAMPLES: dict[str, Callable[[str], None]] = {
    "settings-flags": flags_by_variable,
    "settings-worker-vllm": worker_vllm_names,
    "settings-lora": adapter_found,
}


def adapter_listed(out: str) -> None:
    models = {m["id"]: m["parent"] for m in json.loads(out)["data"]}
    assert models["support-bot"] == "tiny-chat" and models["tiny-chat"] is None


def adapter_answered(out: str) -> None:
    answer = json.loads(out)
    assert answer["status"] == "COMPLETED"
    assert answer["output"][0]["model"] == "customer-42"


# Run in test_e2e_lora.py, against a worker serving those adapters.
LORA_EXAMPLES: dict[str, Callable[[str], None]] = {
    "curl-lora-models": adapter_listed,
    "runsync-lora": adapter_answered,
}


def lb_chat(out: str) -> None:
    answer = json.loads(out)
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny-chat"


# Run against the load-balancing server (test_e2e_lb.py).
LB_EXAMPLES: dict[str, Callable[[str], None]] = {
    "lb-curl-chat": lb_chat,
    "lb-openai-client": printed_text,
}
