"""What every HTTP function shares: the resolver, one error mapping, logging and metrics."""

import base64
import binascii
import json
import os
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import parse_qsl, unquote

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestUnsupportedContentType, RequestValidationError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.utilities.typing import LambdaContext

from candlecast import cache, redaction, snapstart, strictjson
from candlecast.config import get_settings
from candlecast.errors import (
    BadRequest,
    CandlecastError,
    InvalidFields,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    error_body,
    retry_after,
)
from candlecast.metrics import function_metrics, metric_dimensions
from candlecast.pagination import Page

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "candlecast"))
redaction.install(logger)
metrics = function_metrics()

# API Gateway accepts up to 10 MB; no request of ours needs more than a few hundred bytes.
MAX_BODY_BYTES = 16 * 1024
API_DESCRIPTION = (
    "Crypto price forecasts: 30 expected candles with calibrated intervals. "
    "Timeframes: 1h, 4h, 1d, 1w and 1m, where 1m is one calendar month. "
    "Read answers tolerantly: fields may be added, and enumerated response fields (status, kind, error codes) may "
    "gain values, which a client should treat as 'other' rather than fail on; page cursors are opaque, and one "
    "from an older release is 400 invalid_cursor (start the list again)."
)


X_CACHE = {"X-Cache": {"description": "HIT when served from the cache", "schema": {"type": "string",
                                                                                 "enum": ["HIT", "MISS"]}}}

_ERROR_MEANINGS = {
    400: "bad query, path, header or malformed JSON, or a body's symbol that is no ticker (invalid_ticker)",
    404: "not found",
    409: "Idempotency-Key reused for another symbol or timeframe",
    413: "body larger than 16 KiB",
    415: "body is not application/json, or is compressed (Content-Encoding)",
    422: "body is not a JSON object, or its fields are invalid",
    503: "a dependency is unavailable",
}


def described(model: Any, description: str, headers: dict[str, dict] | None = None,
              links: dict[str, dict] | None = None) -> dict:
    """One OpenAPI response: a JSON body of `model`, the headers it carries and the operations it links to."""
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"model": model}}}
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return response


def documented(model: Any, *error_statuses: int, status: int = 200, headers: dict[str, dict] | None = None,
               links: dict[str, dict] | None = None) -> dict[int, dict]:
    """OpenAPI `responses` for a route: its success model and our error body for each error status."""
    from candlecast.schemas import ErrorResponse

    responses = {status: described(model, "success", headers, links)}
    for code in error_statuses:
        responses[code] = {"description": _ERROR_MEANINGS[code],
                           "content": {"application/json": {"model": ErrorResponse}}}
    return responses


# Errors, creates, health and whatever the server does not cache itself: clients ask again.
NO_STORE = "no-store"


def client_cache(kind: str, scope: str = "public") -> str:
    """The Cache-Control of a route's 200 whose body the server caches as `kind` (cache.TTL_SECONDS): a client may
    keep it as long as the server would serve it from its own cache. "private" for what only its requester asked
    for (a prediction); shared caches may keep the rest. The route's `cache_control`; other answers get NO_STORE."""
    return f"{scope}, max-age={cache.TTL_SECONDS[kind]}"


def json_response(body: bytes | str, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response from already-serialised bytes (cached bytes are returned as they are)."""
    return Response(
        status_code=status_code,
        content_type=content_types.APPLICATION_JSON,
        body=body.decode() if isinstance(body, bytes) else body,
        headers=headers,
    )


def page_response(page: Page) -> Response:
    return json_response(page.body, 200, page.headers)


def path_parameter(raw: str) -> str:
    """A path parameter, percent-decoded: API Gateway hands the path on decoded once, so what is left encoded was
    encoded twice by the client (X%253ABTCUSD: X:BTCUSD)."""
    return unquote(raw)


def error_response(status_code: int, code: str, message: str, retry_after: int | None = None) -> Response:
    """Our one error shape; every 503 says when to retry."""
    if status_code == 503 and retry_after is None:
        retry_after = ServiceUnavailable.retry_after
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return json_response(json.dumps(error_body(code, message)), status_code, headers)


def _repeated_parameters(raw_query: str) -> set[str]:
    """Query parameters given more than once: API Gateway joins their values with commas."""
    names = [name for name, _value in parse_qsl(raw_query or "", keep_blank_values=True)]
    return {name for name in names if names.count(name) > 1}


def _describe_validation(errors: list[dict[str, Any]], repeated: Collection[str] = ()) -> tuple[int, str]:
    """400 for bad query/path parameters and malformed bodies, 422 for well-formed bodies with bad fields;
    a bad query parameter that was `repeated` is named as given more than once."""
    problems, status = [], 400
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = str((error.get("ctx") or {}).get("error") or "").strip()
            problems.append(f"body: not valid JSON ({detail})" if detail else "body: not valid JSON")
            continue
        location = [str(part) for part in error.get("loc", ())]
        if location and location[0] == "body":
            status = 422
        where = ".".join(location[1:] if len(location) > 1 else location) or "request"
        if location[:1] == ["query"] and len(location) > 1 and location[1] in repeated:
            problems.append(f"{where}: given more than once; give it once")
            continue
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return status, "; ".join(problems)[:1000]


def create_resolver(validation: bool = True) -> APIGatewayHttpResolver:
    """The resolver of an HTTP function. validation=False only for routes that take no input: Powertools then
    neither imports nor compiles its request validation on a cold start (the OpenAPI document is the same)."""
    get_settings()  # configuration is validated at cold start; a bad variable stops start-up, named
    cache.prepare()  # every HTTP function reads the cache
    app = APIGatewayHttpResolver(enable_validation=validation, json_body_deserializer=strictjson.loads)

    @app.exception_handler(CandlecastError)
    def _domain_error(error: CandlecastError) -> Response:
        if error.status >= 500 and not error.logged:  # one line per cause: a logged cause is not logged again
            logger.warning("request failed", extra={"code": error.code, "error": error.message})
        return error_response(error.status, error.code, error.message, retry_after(error))

    @app.exception_handler(RequestValidationError)
    def _validation_error(error: RequestValidationError) -> Response:
        status, message = _describe_validation(error.errors(),
                                               _repeated_parameters(app.current_event.raw_query_string))
        return error_response(status, "invalid_request" if status == 400 else "validation_error", message)

    @app.exception_handler(RequestUnsupportedContentType)
    def _unsupported_content_type(_error: RequestUnsupportedContentType) -> Response:
        return error_response(415, "unsupported_media_type", "Content-Type must be application/json")

    @app.not_found
    def _not_found(_error: Exception) -> Response:
        return error_response(404, "route_not_found", f"no route for {app.current_event.http_method} "
                                                      f"{app.current_event.path}")

    @app.exception_handler(Exception)
    def _unexpected(error: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")

    return app


_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
               type(None): "null"}


def _json_kind(text: str) -> str | None:
    """What a body that is JSON but not a JSON object is ("an array", ...); None for an object, no body or not
    JSON (validation answers those). Powertools would validate an array's first element as the request."""
    if not text.strip(" \t\n\r") or text.lstrip(" \t\n\r").startswith("{"):
        return None
    try:
        return _JSON_KINDS[type(strictjson.loads(text))]
    except ValueError:  # json.JSONDecodeError
        return None


def _refused_body(event: dict) -> CandlecastError | None:
    """A body we refuse before anything parses or validates it: too large, not UTF-8, not JSON, or JSON that
    is not an object (every body the API takes is one)."""
    body = event.get("body") or ""
    if len(body) > MAX_BODY_BYTES * 4 // 3 + 4:  # too large even as base64: do not decode it
        return PayloadTooLarge(f"request body is over {MAX_BODY_BYTES} bytes, the limit")
    headers = {str(name).lower(): value for name, value in (event.get("headers") or {}).items()}
    encoding = str(headers.get("content-encoding", "")).strip()
    if body and encoding.lower() not in ("", "identity"):  # API Gateway passes a compressed body on as it is
        return UnsupportedMediaType(f"Content-Encoding {encoding[:40]} is not accepted: send the JSON as it is")
    raw = body.encode("utf-8", "surrogatepass")
    if event.get("isBase64Encoded") and body:
        try:
            raw = base64.b64decode(body, validate=True)
        except binascii.Error:
            return BadRequest("request body is marked base64 but is not valid base64", code="invalid_body")
    if len(raw) > MAX_BODY_BYTES:
        return PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadRequest("request body is not UTF-8 text", code="invalid_body")
    content_type = str(headers.get("content-type", "application/json")).split(";")[0].strip().lower()
    if body and content_type != "application/json" and not content_type.endswith("+json"):
        return UnsupportedMediaType(f"Content-Type must be application/json, not {content_type[:100]}")
    if (kind := _json_kind(text)) is not None:
        return InvalidFields(f"body: must be a JSON object, not {kind}")
    if "content-type" in headers:
        # Powertools parses only a literal `application/json`; +json types and other casings are JSON too
        # (and without a body the type does not matter).
        event["headers"] = {name: value for name, value in event["headers"].items() if name.lower() != "content-type"}
        event["headers"]["content-type"] = "application/json"
    return None


def _error_result(error: CandlecastError) -> dict:
    return {
        "statusCode": error.status,
        "headers": {"Content-Type": content_types.APPLICATION_JSON},
        "body": json.dumps(error_body(error.code, error.message)),
        "isBase64Encoded": False,
    }


def lambda_handler_for(app: APIGatewayHttpResolver, function: str) -> Callable[[dict, LambdaContext], dict]:
    """The Lambda handler of the HTTP function `function` (its folder under functions/, e.g. "health")."""
    snapstart.register()  # SnapStart hooks; never called unless the SnapStart parameter is on
    dimensions = metric_dimensions(function)
    # Every line a request logs carries API Gateway's request id (correlation_id), which its access log has too
    # (requestId, with lambdaRequestId, this invocation's id, beside it).
    @logger.inject_lambda_context(clear_state=True, correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
    @metrics.log_metrics(capture_cold_start_metric=not is_metrics_disabled())  # single_metric ignores the flag
    def lambda_handler(event: dict, context: LambdaContext) -> dict:
        # Per invocation: Powertools keeps one set of default dimensions per process, which a local run shares
        # between functions.
        metrics.set_default_dimensions(**dimensions)
        refused = _refused_body(event)
        response = _error_result(refused) if refused else app.resolve(event, context)
        headers = response.setdefault("headers", {})
        headers["X-Content-Type-Options"] = "nosniff"  # JSON holding upstream text is never read as a page
        if response["statusCode"] != 200 or "Cache-Control" not in headers:
            headers["Cache-Control"] = NO_STORE  # Powertools gives a cached route's errors "no-cache"
        else:
            # API Gateway's CORS answers a listed origin with that origin: a shared cache must not hand it to another.
            headers["Vary"] = ", ".join(filter(None, (headers.get("Vary"), "Origin")))
        metrics.add_metric(name=f"Responses{response['statusCode'] // 100}xx", unit=MetricUnit.Count, value=1)
        return response

    return lambda_handler
