"""The committed OpenAPI document is generated from the resolvers and covers exactly the template's routes."""

import json
import re

import pytest

from infra import openapi
from infra.sam_template import load_template, parse_routes

pytestmark = pytest.mark.template

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def test_committed_document_is_current(importable):
    committed = openapi.DOCUMENT.read_text()
    assert committed == openapi.render(openapi.build_openapi()), "run `make openapi`"


def test_document_operations_are_the_template_routes():
    document = json.loads(openapi.DOCUMENT.read_text())
    operations = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    routes = {(route.method, route.path) for route in parse_routes(load_template())}
    assert operations == routes
    assert document["openapi"].startswith("3.")
    assert "1m" in document["info"]["description"]  # the calendar-month timeframe is documented


def test_conflicting_definitions_are_refused():
    target = {"Candle": {"type": "object"}}
    with pytest.raises(openapi.OpenApiConflict):
        openapi._merge_into(target, {"Candle": {"type": "array"}}, "schema")
    openapi._merge_into(target, {"Candle": {"type": "object"}}, "schema")  # the same definition is fine


def test_document_is_valid_openapi():
    from openapi_spec_validator import validate

    validate(json.loads(openapi.DOCUMENT.read_text()))  # raises, naming the first problem


def test_every_reference_resolves_and_every_schema_is_used():
    document = json.loads(openapi.DOCUMENT.read_text())
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    for name in schemas:
        assert f'"#/components/schemas/{name}"' in text, f"{name} is never used"
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in schemas, f"dangling reference to {ref}"
    with pytest.raises(openapi.OpenApiConflict, match="refers to no schema"):
        openapi._referenced({"/x": {"$ref": "#/components/schemas/Gone"}}, {})


def _operation(document: dict, method: str, path: str) -> dict:
    return document["paths"][path][method]


def test_what_the_code_does_is_documented():
    document = json.loads(openapi.DOCUMENT.read_text())
    schema_of = lambda response: response["content"]["application/json"]["schema"]  # noqa: E731
    health = _operation(document, "get", "/health")["responses"]
    assert schema_of(health["200"]) == schema_of(health["503"]) == {"$ref": "#/components/schemas/HealthReport"}
    create = _operation(document, "post", "/predictions")["responses"]
    assert schema_of(create["200"]) == schema_of(create["201"])
    assert "X-Cache" in create["200"]["headers"]
    (prediction_id,) = _operation(document, "get", "/predictions/{id}")["parameters"]
    assert prediction_id["schema"]["format"] == "uuid"
    assert document["components"]["schemas"]["Prediction"]["properties"]["id"]["format"] == "uuid"
    from candlecast.tickers import PATH_TICKER_PATTERN, TICKER_PATTERN

    for path in ("/symbols/{ticker}", "/symbols/{ticker}/predictions"):
        ticker = next(p for p in _operation(document, "get", path)["parameters"] if p["name"] == "ticker")
        assert ticker["schema"]["pattern"] == PATH_TICKER_PATTERN  # no "/": API Gateway decodes %2F before routing
    assert document["components"]["schemas"]["PredictionRequest"]["properties"]["symbol"]["pattern"] == TICKER_PATTERN
    for path in ("/symbols", "/symbols/top", "/symbols/{ticker}/predictions"):
        operation = _operation(document, "get", path)
        assert "cursor" in {p["name"] for p in operation["parameters"]}, path
        assert "X-Next-Cursor" in operation["responses"]["200"]["headers"], path


def test_the_create_route_says_what_a_repeat_is_as_the_request_hash_does():
    """A repeat is the same symbol, timeframe, model and candle content (forecasting._request_hash), not the same
    last candle: a candle file fixed in place is a new request."""
    description = _operation(json.loads(openapi.DOCUMENT.read_text()), "post", "/predictions")["description"]
    assert "same symbol, timeframe, model and candles (their content" in description
    assert "last candle" not in description


@pytest.mark.parametrize("ticker", ["BTCUSD", "X:BTCUSD", "x:btcusd", "btc-usd", "BTC/USD", "eth_usdt", "1INCH-USDT",
                                    "ab", "A" * 24, "X:" + "A" * 12 + "-" + "B" * 12])
def test_tickers_the_document_allows_are_accepted(ticker):
    from candlecast.tickers import TICKER_PATTERN, normalize_ticker

    assert re.fullmatch(TICKER_PATTERN, ticker)
    assert normalize_ticker(ticker) == "X:" + re.sub(r"[-/_]", "", ticker.upper().removeprefix("X:"))


@pytest.mark.parametrize("ticker", ["BTC USD", "-BTC", "BTC-", "BTC--USD", "X:", "BTC.USD", "BTCUSD\n", "ETHUſD",
                                    "BTC%USD", "", "A", "A" * 25, "A-B-C"])
def test_tickers_the_document_refuses(ticker):
    from candlecast.tickers import TICKER_PATTERN

    assert not re.fullmatch(TICKER_PATTERN, ticker)


def test_the_documented_query_pattern_is_what_search_refuses():
    import unicodedata

    from candlecast.services.symbols import QUERY_PATTERN

    refused = re.compile(QUERY_PATTERN)
    for code in range(0x10000):
        char = chr(code)
        if unicodedata.category(char) == "Cs":
            continue
        control_or_format = unicodedata.category(char) in ("Cc", "Cf")
        assert (refused.fullmatch(char) is None) == control_or_format, f"U+{code:04X}"


def test_every_field_a_symbol_always_carries_is_required_in_the_schema():
    schema = json.loads(openapi.DOCUMENT.read_text())["components"]["schemas"]["Symbol"]
    assert set(schema["required"]) == set(schema["properties"])


OURS_OR_GATEWAYS = {"anyOf": [{"$ref": "#/components/schemas/ErrorResponse"},
                              {"$ref": "#/components/schemas/GatewayMessage"}]}


def _body_schema(document: dict, path: str, status: str) -> dict:
    """The JSON schema of a GET's answer with this status, its references resolved in the document."""
    schema = document["paths"][path]["get"]["responses"][status]["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}


@pytest.mark.parametrize(("path", "status", "body"), [
    ("/health", "500", {"error": {"code": "internal_error", "message": "an unexpected error occurred"}}),
    ("/health", "500", {"message": "Internal Server Error"}),
    ("/symbols/{ticker}", "404", {"error": {"code": "symbol_not_found", "message": "no symbol BTCUSD"}}),
    ("/symbols/{ticker}", "404", {"message": "Not Found"}),
])
def test_both_bodies_a_500_or_a_404_can_have_are_declared(path, status, body):
    """Audit (a generated client): the 500 was declared as API Gateway's body only, so our own `internal_error`
    answer crashed the generated parser (KeyError 'message'); a 404 for a path no route matches (a ticker holding
    an encoded slash) crashed it the other way (KeyError 'error')."""
    import jsonschema

    jsonschema.validate(body, _body_schema(json.loads(openapi.DOCUMENT.read_text()), path, status))


def test_every_answer_documents_the_headers_it_carries_and_api_gateways_500():
    """Audit: a client reading only the document could not learn that a 503 is retryable after Retry-After, how
    long an answer may be kept, or that API Gateway answers 500 when a function fails."""
    document = json.loads(openapi.DOCUMENT.read_text())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert responses["500"]["content"]["application/json"]["schema"] == OURS_OR_GATEWAYS, (method, path)
            if "{" in path:
                assert responses["404"]["content"]["application/json"]["schema"] == OURS_OR_GATEWAYS, (method, path)
            for status, response in responses.items():
                if status in ("429", "500"):  # API Gateway's own answers
                    continue
                assert "Cache-Control" in response["headers"], (method, path, status)
                assert ("Retry-After" in response["headers"]) == (status == "503"), (method, path, status)
    assert set(document["components"]["headers"]) == {"Cache-Control", "Retry-After"}


def _closed_enums(node, where: str = "") -> list[str]:
    """Where a string enum stands alone (not as one branch of an anyOf with any string)."""
    if isinstance(node, list):
        return [found for index, item in enumerate(node) for found in _closed_enums(item, f"{where}[{index}]")]
    if not isinstance(node, dict):
        return []
    branches = node.get("anyOf", [])
    if any("enum" in branch for branch in branches) and {"type": "string"} in branches:
        return []
    found = [where] if "enum" in node else []
    return found + [hit for key, value in node.items() for hit in _closed_enums(value, f"{where}/{key}")]


def test_response_enums_are_open_and_request_enums_closed():
    """Audit: the description says enumerated response fields may gain values, but they were closed enums, and a
    client generated from the document failed on a new value (`'read_only' is not a valid DependencyCheckStatus`)."""
    document = json.loads(openapi.DOCUMENT.read_text())
    schemas = document["components"]["schemas"]
    responses = {name: schema for name, schema in schemas.items() if name not in ("PredictionRequest", "Timeframe")}
    assert _closed_enums(responses) == []
    text = json.dumps(responses)  # the shared Timeframe is closed for requests, and opened where answers use it
    assert text.count('"anyOf": [{"$ref": "#/components/schemas/Timeframe"}, {"type": "string"}]') == text.count(
        '"#/components/schemas/Timeframe"') > 0
    assert _closed_enums([response.get("headers") for operations in document["paths"].values()
                          for operation in operations.values() for response in operation["responses"].values()]) == []
    assert schemas["ModelStatus"]["properties"]["status"]["anyOf"][0]["enum"] == [
        "active", "file_missing", "missing", "unknown"]
    assert schemas["Timeframe"]["enum"] == ["1h", "4h", "1d", "1w", "1m"]
    assert schemas["PredictionRequest"]["properties"]["timeframe"]["$ref"] == "#/components/schemas/Timeframe"
    timeframe = _operation(document, "get", "/models/{timeframe}")["parameters"][0]["schema"]
    assert timeframe["$ref"] == "#/components/schemas/Timeframe"


def test_the_timeframes_are_one_named_schema_that_every_field_and_parameter_refers_to():
    """Audit (a generated client): each use was its own anonymous enum, so a client got seven timeframe classes
    with members VALUE_0..VALUE_4, and a response's timeframe could not be passed back in a request."""
    document = json.loads(openapi.DOCUMENT.read_text())
    text = json.dumps(document)
    assert text.count('["1h", "4h", "1d", "1w", "1m"]') == 1
    assert text.count('"#/components/schemas/Timeframe"') >= 7
    assert document["components"]["schemas"]["Timeframe"]["x-enum-varnames"] == [
        "ONE_HOUR", "FOUR_HOURS", "ONE_DAY", "ONE_WEEK", "ONE_MONTH"]
