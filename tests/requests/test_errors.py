"""Every error a client can receive, in OpenAI's shape, and vLLM's own errors kept."""

from __future__ import annotations

import json

from worker.requests.errors import ProxyError, error_body, from_upstream, parse_job_error


def test_every_error_has_openais_four_fields_with_the_status_as_code() -> None:
    assert error_body(404, "gone", "model") == {"error": {
        "message": "gone", "type": "NotFoundError", "param": "model", "code": 404}}
    assert error_body(599, "odd")["error"]["type"] == "InternalServerError"
    assert error_body(418, "odd")["error"]["type"] == "BadRequestError"


def test_a_failed_jobs_error_is_the_json_text_of_that_body() -> None:
    error = ProxyError(503, "vLLM is not running")
    output = error.job_output()
    assert set(output) == {"error"} and json.loads(output["error"]) == error.body()
    assert parse_job_error(output["error"]) == (503, error.body())


def test_anything_else_in_a_jobs_error_becomes_a_500_that_leaks_nothing() -> None:
    for text in ("handler: boom traceback: ...", '{"error": {"code": 200}}', "null", ""):
        status, body = parse_job_error(text)
        assert status == 500 and "worker's log" in body["error"]["message"]
        assert "boom" not in body["error"]["message"]


def test_vllms_error_keeps_its_message_type_and_param() -> None:
    vllm = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                      "param": "model", "code": 404}}
    error = from_upstream(404, json.dumps(vllm).encode())
    assert error.body() == vllm


def test_fastapi_details_and_plain_text_are_quoted() -> None:
    detail = from_upstream(404, b'{"detail": "Not Found"}')
    assert detail.status == 404 and "Not Found" in detail.message
    text = from_upstream(500, b"Internal Server Error")
    assert text.message == "vLLM answered HTTP 500: Internal Server Error"
    assert from_upstream(502, b"").message.endswith("(empty body)")


def test_a_known_vllm_message_gets_its_fix_added() -> None:
    message = ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
               "to be set")
    error = from_upstream(400, json.dumps({"error": {"message": message}}).encode())
    assert error.message.startswith(message) and "TOOL_CALL_PARSER" in error.message
