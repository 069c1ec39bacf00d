"""The body guards every function applies before parsing (candlecast.api): size, encoding, content type.

A body the guards let through reaches validation: a well-formed body with an unknown field is a 422
`validation_error`, which is how these tests tell "passed the guard" from "refused by it".
"""

import base64
import json

import pytest

from candlecast.api import MAX_BODY_BYTES
from infra.events import create_event
from tests.conftest import invoke, load_event

pytestmark = pytest.mark.integration


def post(body: str | bytes, content_type: str | None = "application/json", *, as_base64: bool = False):
    raw = body.encode() if isinstance(body, str) else body
    event = create_event(base64.b64encode(raw).decode() if as_base64 else raw.decode(), isBase64Encoded=as_base64)
    event["headers"].pop("content-type", None)
    if content_type is not None:
        event["headers"]["content-type"] = content_type
    return invoke("predictions_create", event)


def padded(size: int) -> str:
    """A JSON object of exactly `size` bytes that no request accepts (an unknown field)."""
    head = '{"symbol": "BTC-USD", "timeframe": "1h", "pad": "'
    return head + "x" * (size - len(head) - 2) + '"}'


def assert_error(response, status: int, code: str):
    got_status, _, body = response
    assert (got_status, body["error"]["code"]) == (status, code), body


@pytest.fixture(autouse=True)
def _env(app_env):
    return app_env


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413():
    assert len(padded(MAX_BODY_BYTES).encode()) == MAX_BODY_BYTES == 16 * 1024
    assert_error(post(padded(MAX_BODY_BYTES)), 422, "validation_error")
    too_large = post(padded(MAX_BODY_BYTES + 1))
    assert_error(too_large, 413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in too_large[2]["error"]["message"]


def test_the_limit_counts_decoded_bytes_of_a_base64_body():
    assert_error(post(padded(MAX_BODY_BYTES), as_base64=True), 422, "validation_error")
    assert_error(post(padded(MAX_BODY_BYTES + 1), as_base64=True), 413, "payload_too_large")
    assert_error(post("x" * (MAX_BODY_BYTES * 2), as_base64=True), 413, "payload_too_large")  # not decoded


def test_multibyte_text_is_measured_in_bytes_not_characters():
    text = padded(MAX_BODY_BYTES - 200) .replace('"}', "é" * 101 + '"}')  # 202 bytes, 101 characters
    assert len(text) <= MAX_BODY_BYTES < len(text.encode())
    assert_error(post(text), 413, "payload_too_large")


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/problem+json",
    "application/vnd.candlecast+json; charset=utf-8", None,
])
def test_json_content_types_are_accepted(content_type):
    assert_error(post('{"symbol": "BTC-USD", "timeframe": "2h"}', content_type), 422, "validation_error")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx",
                                          "application/json+xml", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(content_type):
    response = post('{"symbol": "BTC-USD", "timeframe": "1h"}', content_type)
    assert_error(response, 415, "unsupported_media_type")
    assert response[2]["error"]["message"] == f"Content-Type must be application/json, not {content_type.split(';')[0]}"


def test_bodies_that_are_not_utf8_json_are_400_naming_the_problem():
    assert_error(post(b'{"symbol": "\xff"}', as_base64=True), 400, "invalid_body")
    not_base64 = load_event("predictions_create.json", body="%%%not base64%%%", isBase64Encoded=True)
    status, _, body = invoke("predictions_create", not_base64)
    assert (status, body["error"]["code"]) == (400, "invalid_body") and "base64" in body["error"]["message"]
    status, _, body = post("{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_request") and "JSON" in body["error"]["message"]


def test_an_empty_body_is_a_validation_error_not_a_guard_refusal():
    status, _, body = post("", "text/plain")  # no body: the content type does not matter
    assert status in (400, 422) and body["error"]["code"] in ("invalid_request", "validation_error")
    assert json.dumps(body).count("payload_too_large") == 0


def raw_event(body: str, *, as_base64: bool):
    return invoke("predictions_create", create_event(body, isBase64Encoded=as_base64))


def test_a_base64_body_too_long_to_be_under_the_limit_is_refused_before_decoding():
    shortcut = MAX_BODY_BYTES * 4 // 3 + 4  # 21849 characters: the longest that may still decode to 16 KiB
    status, _, body = raw_event("A" * (shortcut + 1), as_base64=True)
    assert (status, body["error"]) == (413, {"code": "payload_too_large",
                                             "message": "request body is over 16384 bytes, the limit"})
    status, _, body = raw_event("A" * shortcut, as_base64=True)  # decoded, and 21849 is not base64's length
    assert (status, body["error"]) == (400, {"code": "invalid_body",
                                             "message": "request body is marked base64 but is not valid base64"})
    status, _, body = raw_event(base64.b64encode(b"x" * (MAX_BODY_BYTES + 2)).decode(), as_base64=True)
    assert (status, body["error"]) == (413, {"code": "payload_too_large",
                                             "message": "request body is 16386 bytes; the limit is 16384"})


def test_base64_is_strict_and_text_must_be_utf8():
    status, _, body = raw_event("e3!0=", as_base64=True)  # "{}" once the stray "!" were dropped
    assert (status, body["error"]["code"]) == (400, "invalid_body")
    status, _, body = raw_event('{"symbol": "\ud800"}', as_base64=False)  # a lone surrogate is no UTF-8
    assert (status, body["error"]) == (400, {"code": "invalid_body", "message": "request body is not UTF-8 text"})


def test_a_refused_body_is_a_plain_json_result_as_api_gateway_needs_it():
    from infra.lambda_loader import LambdaContext, load_handler
    from tests.conftest import ROOT

    event = load_event("predictions_create.json", body="{}", isBase64Encoded=False)
    event["headers"]["content-type"] = "text/plain"
    result = load_handler(ROOT / "functions" / "predictions_create")(event, LambdaContext())
    assert result["statusCode"] == 415
    assert result["isBase64Encoded"] is False
    assert {name.lower(): value for name, value in result["headers"].items()}["content-type"] == "application/json"
    assert json.loads(result["body"])["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_415_naming_its_encoding(encoding):
    import gzip

    event = load_event("predictions_create.json", isBase64Encoded=True,
                       body=base64.b64encode(gzip.compress(b'{"symbol": "BTC-USD", "timeframe": "1h"}')).decode())
    event["headers"]["content-encoding"] = encoding
    response = invoke("predictions_create", event)
    assert_error(response, 415, "unsupported_media_type")
    assert response[2]["error"]["message"] == f"Content-Encoding {encoding} is not accepted: send the JSON as it is"


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", ""])
def test_an_identity_encoding_is_no_encoding(encoding):
    event = load_event("predictions_create.json", body='{"symbol": "BTC-USD", "timeframe": "2h"}')
    event["headers"]["content-encoding"] = encoding
    assert_error(invoke("predictions_create", event), 422, "validation_error")



NOT_OBJECTS = [
    ([{"symbol": "BTC-USD", "timeframe": "1w"}], "an array"),
    ([{"symbol": "BTC-USD", "timeframe": "1w"}, {"symbol": "ETHUSD", "timeframe": "1d"}], "an array"),
    ([{"symbol": 1}, {"symbol": "BTC-USD", "timeframe": "1w"}], "an array"),
    ([[{"symbol": "BTC-USD", "timeframe": "1w"}]], "an array"),
    ([], "an array"),
    (["BTC-USD", "1w"], "an array"),
    ("BTC-USD", "a string"),
    (7, "a number"),
    (True, "a boolean"),
    (None, "null"),
]


def test_a_body_that_is_not_a_json_object_is_422_and_nothing_is_stored(seeded):
    """Powertools validates the first element of an array body as the request: it must not get the chance."""
    import psycopg

    def stored() -> int:
        with psycopg.connect(seeded.database_url) as conn:
            return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]

    for body, kind in NOT_OBJECTS:
        response = post(json.dumps(body))
        assert_error(response, 422, "validation_error")
        assert response[2]["error"]["message"] == f"body: must be a JSON object, not {kind}"
        response = post(" \n" + json.dumps(body, indent=1), as_base64=True)  # whitespace first, base64
        assert response[2]["error"]["message"] == f"body: must be a JSON object, not {kind}"
    assert stored() == 0
    assert post('[{"symbol": "BTC-USD"')[0] == 400  # not JSON at all: still the parse error
    assert post(json.dumps({"symbol": "BTC-USD", "timeframe": "1w"}))[0] == 201  # the object itself is fine
    assert stored() == 1


def test_a_query_parameter_given_twice_is_named_as_such():
    from infra.events import load_event

    event = load_event("symbols_search.json", rawQueryString="q=btc&limit=1&limit=2",
                       queryStringParameters={"q": "btc", "limit": "1,2"})  # as API Gateway joins them
    status, _, body = invoke("symbols", event)
    assert (status, body["error"]) == (400, {"code": "invalid_request",
                                             "message": "limit: given more than once; give it once"})
    event = load_event("symbols_search.json", rawQueryString="q=btc&limit=x", queryStringParameters={
        "q": "btc", "limit": "x"})
    status, _, body = invoke("symbols", event)  # once, but bad: pydantic's own words
    assert status == 400 and body["error"]["message"].startswith("limit: Input should be a valid integer")
