"""What API Gateway's HTTP API does around a function: the payload format 2.0 event it builds from an HTTP
request, the HTTP response it makes of the function's result, its CORS answers, and its own error bodies.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from infra.sam_template import LOCAL_ACCOUNT_ID, Route, Throttle, Unresolvable, resolve

MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway HTTP API payload limit
LOCAL_API_ID = "local"
# Content types API Gateway passes as text; every other request body arrives base64-encoded.
_TEXT_TYPES = re.compile(
    r"^(text/[^;]+|application/(json|javascript|xml|[\w.+-]+\+(json|xml)))\s*(;.*)?$", re.IGNORECASE)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

log = logging.getLogger("local_api")


@dataclass
class HttpRequest:
    method: str
    target: str  # path and query exactly as sent, e.g. "/symbols?q=btc&limit=5"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    source_ip: str = "127.0.0.1"
    protocol: str = "HTTP/1.1"


def _request_time(epoch_ms: int) -> str:
    moment = time.gmtime(epoch_ms / 1000)
    return f"{moment.tm_mday:02d}/{_MONTHS[moment.tm_mon - 1]}/{moment.tm_year}:" + time.strftime(
        "%H:%M:%S +0000", moment)


def _trace_id(epoch_ms: int) -> str:
    return f"Root=1-{epoch_ms // 1000:08x}-{secrets.token_hex(12)}"


def new_request_id() -> str:
    """API Gateway request ids look like 'JKJaXmPLvHcESHA='."""
    return base64.b64encode(secrets.token_bytes(10)).decode()


def gateway_path(target: str) -> str:
    """The path as API Gateway routes on it and hands it on (rawPath): percent-decoded, so an encoded %2F is a
    separator (/symbols/BTC%2FUSD is /symbols/BTC/USD, which no route of one segment matches)."""
    return unquote(urlsplit(target).path) or "/"


def build_event(request: HttpRequest, route: Route | None, path_parameters: Mapping[str, str] | None = None,
                *, request_id: str | None = None, epoch_ms: int | None = None, stage: str = "$default",
                api_id: str = LOCAL_API_ID, account_id: str = LOCAL_ACCOUNT_ID) -> dict:
    """The API Gateway HTTP API payload format 2.0 event for one request, as AWS sends it.

    Header names are lower-cased and repeated headers comma-joined; the Cookie header moves to `cookies`;
    repeated query parameters are comma-joined; optional keys are absent (not null) when empty;
    a body whose content type is not text arrives base64-encoded.
    """
    epoch_ms = int(time.time() * 1000) if epoch_ms is None else epoch_ms
    split = urlsplit(request.target)
    raw_path = gateway_path(request.target)
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in request.headers:
        name = name.lower()
        if name == "cookie":
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
        else:
            headers[name] = f"{headers[name]},{value}" if name in headers else value
    domain_name = headers.get("host", "localhost").rsplit(":", 1)[0] if "host" in headers else "localhost"
    headers.setdefault("x-forwarded-for", request.source_ip)
    headers.setdefault("x-forwarded-port", headers.get("host", "").rpartition(":")[2] or "80")
    headers.setdefault("x-forwarded-proto", "http")
    headers.setdefault("x-amzn-trace-id", _trace_id(epoch_ms))
    if request.body:
        headers.setdefault("content-length", str(len(request.body)))

    query: dict[str, str] = {}
    for name, value in parse_qsl(split.query, keep_blank_values=True):
        query[name] = f"{query[name]},{value}" if name in query else value

    route_key = route.route_key if route is not None else "$default"
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": raw_path,
        "rawQueryString": split.query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if query:
        event["queryStringParameters"] = query
    event["requestContext"] = {
        "accountId": account_id,
        "apiId": api_id,
        "domainName": domain_name,
        "domainPrefix": domain_name.split(".", 1)[0],
        "http": {
            "method": request.method.upper(),
            "path": raw_path,
            "protocol": request.protocol,
            "sourceIp": request.source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": request_id or new_request_id(),
        "routeKey": route_key,
        "stage": stage,
        "time": _request_time(epoch_ms),
        "timeEpoch": epoch_ms,
    }
    if request.body:
        is_text = _TEXT_TYPES.match(headers.get("content-type", "")) is not None
        try:
            event["body"] = request.body.decode() if is_text else base64.b64encode(request.body).decode()
        except UnicodeDecodeError:
            is_text = False
            event["body"] = base64.b64encode(request.body).decode()
        event["isBase64Encoded"] = not is_text
    else:
        event["isBase64Encoded"] = False
    if path_parameters:
        event["pathParameters"] = dict(path_parameters)
    return event


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    function_id: str = ""  # which function answered (for the access log)


def error_response(status: int, code: str, message: str) -> HttpResponse:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return HttpResponse(status, [("content-type", "application/json")], body)


def too_large(limit: int = MAX_BODY_BYTES) -> HttpResponse:
    return error_response(413, "payload_too_large", f"request body is over {limit} bytes, the limit")


def gateway_response(status: int, message: str) -> HttpResponse:
    """API Gateway's own answers, as an HTTP API sends them: JSON `{"message": ...}`, no other header (HTTP
    APIs cannot customise them, nor add Retry-After; gateway responses are a REST API feature)."""
    return HttpResponse(status, [("content-type", "application/json")], json.dumps({"message": message}).encode())


def throttled_by_route() -> HttpResponse:
    """The route's throttle had no token: API Gateway answers without invoking the function."""
    return gateway_response(429, "Too Many Requests")


def invoke_refused() -> HttpResponse:
    """Lambda refused the invoke (the function's reserved concurrency was in use): API Gateway's 500
    (docs.aws.amazon.com/lambda/latest/dg/services-apigateway-errors.html)."""
    return gateway_response(500, "Internal Server Error")


class TokenBucket:
    """API Gateway's throttle on one route: `burst` tokens, refilled at `rate` per second up to `burst`; each
    request takes one, or is answered 429. It starts full, so any T seconds let through at most burst + rate x T."""

    def __init__(self, throttle: Throttle, clock=time.monotonic):
        self.rate, self.burst = throttle.rate, throttle.burst
        self._clock = clock
        self._tokens = float(throttle.burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

def to_http_response(result: Any) -> HttpResponse:
    """Translate a Lambda result the way API Gateway does for payload format 2.0."""
    if not (isinstance(result, Mapping) and "statusCode" in result):
        # No statusCode: API Gateway assumes 200, JSON, and the whole result as the body.
        return HttpResponse(200, [("content-type", "application/json")], json.dumps(result).encode())
    status = int(result["statusCode"])
    headers = [(str(name).lower(), str(value)) for name, value in (result.get("headers") or {}).items()]
    for name, values in (result.get("multiValueHeaders") or {}).items():
        headers.extend((str(name).lower(), str(value)) for value in values)
    headers.extend(("set-cookie", str(cookie)) for cookie in result.get("cookies") or [])
    body = result.get("body") or ""
    if not isinstance(body, str):
        raise TypeError("the response body must be a string")
    payload = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    return HttpResponse(status, headers, payload)



@dataclass
class Cors:
    """An HttpApi CorsConfiguration, applied as API Gateway does (its headers replace the function's)."""

    allow_origins: list[str]
    allow_methods: list[str] = field(default_factory=list)
    allow_headers: list[str] = field(default_factory=list)
    expose_headers: list[str] = field(default_factory=list)
    allow_credentials: bool = False
    max_age: int | None = None

    @classmethod
    def from_template(cls, template: Mapping, parameters: Mapping[str, Any]) -> Cors | None:
        for resource in (template.get("Resources") or {}).values():
            if resource.get("Type") != "AWS::Serverless::HttpApi":
                continue
            config = (resource.get("Properties") or {}).get("CorsConfiguration")
            if not config:
                continue
            try:
                config = resolve(config, parameters, template.get("Conditions"))
            except Unresolvable:
                log.warning("CorsConfiguration cannot be resolved locally; CORS is off")
                return None
            if config is True:
                return cls(allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

            def items(key: str, config: Mapping = config) -> list[str]:
                value = config.get(key) or []
                return [value] if isinstance(value, str) else [str(item) for item in value]

            return cls(items("AllowOrigins"), items("AllowMethods"), items("AllowHeaders"),
                       items("ExposeHeaders"), bool(config.get("AllowCredentials")),
                       int(config["MaxAge"]) if config.get("MaxAge") is not None else None)
        return None

    @staticmethod
    def _header(request: HttpRequest, name: str) -> str | None:
        return next((value for key, value in request.headers if key.lower() == name), None)

    def is_preflight(self, request: HttpRequest) -> bool:
        return (request.method == "OPTIONS" and self._header(request, "origin") is not None
                and self._header(request, "access-control-request-method") is not None)

    def apply(self, request: HttpRequest, response: HttpResponse) -> None:
        origin = self._header(request, "origin")
        if origin is None or not ("*" in self.allow_origins or origin in self.allow_origins):
            return
        response.headers = [(k, v) for k, v in response.headers if not k.startswith("access-control-")]
        add = response.headers.append
        add(("access-control-allow-origin", "*" if "*" in self.allow_origins else origin))
        if self.allow_credentials:
            add(("access-control-allow-credentials", "true"))
        if self.expose_headers:
            add(("access-control-expose-headers", ",".join(self.expose_headers)))
        if self.is_preflight(request):
            add(("access-control-allow-methods", ",".join(self.allow_methods)))
            if self.allow_headers:
                add(("access-control-allow-headers", ",".join(self.allow_headers)))
            if self.max_age is not None:
                add(("access-control-max-age", str(self.max_age)))

