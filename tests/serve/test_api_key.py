"""The API key check of both servers: the Bearer scheme in any case, one header only."""

from __future__ import annotations

import pytest

from worker.serve.api_key import refusal

KEY = "k-123"


@pytest.mark.parametrize("value", [b"Bearer k-123", b"bearer k-123", b"BEARER  k-123 ",
                                   b" Bearer k-123"])
def test_the_right_key_passes_whatever_the_case_of_its_scheme(value: bytes) -> None:
    assert refusal([(b"authorization", value)], KEY) is None


@pytest.mark.parametrize("value", [b"", b"Bearer", b"Bearer k-12", b"Basic k-123", b"k-123",
                                   b"Bearer k-123x", b"Token k-123"])
def test_anything_else_is_a_401_that_says_what_to_send(value: bytes) -> None:
    refused = refusal([(b"authorization", value)] if value else [], KEY)
    assert refused is not None and refused.status == 401
    assert "Authorization: Bearer <key>" in refused.message


def test_two_authorization_headers_are_refused_whichever_holds_the_key() -> None:
    for pair in ([b"Bearer k-123", b"Bearer x"], [b"Bearer x", b"Bearer k-123"]):
        refused = refusal([(b"authorization", value) for value in pair], KEY)
        assert refused is not None and refused.status == 400
        assert "2 Authorization headers" in refused.message


def test_without_a_key_every_request_passes() -> None:
    assert refusal([], None) is None
    assert refusal([(b"authorization", b"Bearer anything")], None) is None
