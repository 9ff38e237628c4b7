"""The stand-ins themselves (fakes/): what the other tests and the benchmarks rely on."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from fakes.platform import WORKER_ID, Platform
from fakes.vllm import free_port, write_launcher
from support.workers import wait_until


def test_the_platform_fails_its_check_on_a_request_it_does_not_serve() -> None:
    with Platform() as platform:
        base = f"http://127.0.0.1:{platform.port}/v2/test-endpoint"
        assert httpx.get(f"{base}/job-take/another-worker").status_code == 404
        assert httpx.post(f"{base}/ping/{WORKER_ID}").status_code == 404
        assert httpx.get(f"{base}/ping/{WORKER_ID}").status_code == 200
    with pytest.raises(AssertionError) as failed:
        platform.check()
    assert str(failed.value).splitlines() == [
        "unexpected request: GET /v2/test-endpoint/job-take/another-worker",
        f"unexpected request: POST /v2/test-endpoint/ping/{WORKER_ID}"]
    assert len(platform.received) == 3


def test_a_job_take_hands_out_what_is_queued_and_the_batch_form_a_list() -> None:
    with Platform(poll=0.1) as platform:
        take = platform.env()["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", WORKER_ID)
        nothing = httpx.get(take)
        ids = [platform.queue_job({"n": n}) for n in range(3)]
        first = httpx.get(take).json()
        batch = httpx.get(take.replace("/job-take/", "/job-take-batch/") + "&batch_size=5")
        done = platform.env()["RUNPOD_WEBHOOK_POST_OUTPUT"].replace(
            "$RUNPOD_POD_ID", WORKER_ID).replace("$ID", ids[0])
        httpx.post(f"{done}&isStream=false", content=json.dumps({"output": "é"}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        result = platform.result(ids[0])
    assert nothing.status_code == 204
    assert first == {"id": ids[0], "input": {"n": 0}}
    assert [job["id"] for job in batch.json()] == ids[1:]
    assert result == {"output": "é"} and platform.result_queries[ids[0]]["isStream"] == "false"
    assert platform.takes == 3 and platform.taking == 0
    platform.check()


def test_the_launcher_runs_the_stand_in_from_any_directory_recording_the_bytes_sent(
        tmp_path: Path) -> None:
    """As the worker's child: vLLM's argv, any cwd; the record holds exactly what was sent."""
    port, record = free_port(), tmp_path / "record.jsonl"
    process = subprocess.Popen(
        [write_launcher(tmp_path), "-m", "vllm.entrypoints.openai.api_server", "--model",
         "/models/tiny", "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
         "tiny", "--seed", "1"], cwd="/", env={**os.environ, "FAKE_VLLM_RECORD": str(record)},
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        assert "Uvicorn running on" in next(line for line in process.stdout if "Uvicorn" in line)
        body = {"model": "tiny", "messages": [], "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                          json=body) as answer:
            sent = answer.read()
        assert "POST /v1/chat/completions HTTP/1.1\" 200 OK" in process.stdout.readline()
        # The stand-in records a stream once it has ended on its side, which may come
        # after the client has read the last byte.
        wait_until(lambda: record.exists() and record.read_text().endswith("\n"), 10,
                   "the stream's record")
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    data = [json.loads(line[6:]) for line in sent.decode().split("\n\n")[:-2]]
    assert [d["choices"][0]["delta"]["content"] for d in data] == ["", "tok0 ", "tok1 ", "tok2 "]
    assert [json.loads(line) for line in record.read_text().splitlines()] == [{
        "method": "POST", "path": "/v1/chat/completions", "body": body, "status": 200,
        "response": sent.decode()}]
