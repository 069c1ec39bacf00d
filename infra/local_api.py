"""Our Docker-free `sam local start-api`.

It reads template.yaml's HttpApi routes and, for each HTTP request, builds a real API Gateway HTTP API
payload format 2.0 event and calls that function's `lambda_handler(event, context)` in this process, with
the function's folder and its layers on sys.path as Lambda lays them out. The handler's v2 response is
translated back to HTTP exactly as API Gateway would. It also serves /openapi.json and an offline /docs page.

    python -m infra.local_api --port 3000      # needs DATABASE_URL, REDIS_URL, DATA_BUCKET, ... set
    python -m infra.run_local --port 3000      # starts the local stack first (that is `make run`)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

from infra.lambda_loader import LambdaContext, load_function_module

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = ROOT / "template.yaml"
DOCS_PAGE = Path(__file__).with_name("docs.html")  # renders /openapi.json offline

MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway HTTP API payload limit
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous response limit
LOCAL_ACCOUNT_ID = "123456789012"
LOCAL_API_ID = "local"
LOCAL_REGION = "us-east-1"
DEFAULT_TIMEOUT_S = 3  # Lambda's default
DEFAULT_MEMORY_MB = 128
PSEUDO_PARAMETERS = {
    "AWS::AccountId": LOCAL_ACCOUNT_ID,
    "AWS::Region": LOCAL_REGION,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "candlecast-local",
    "AWS::NoValue": None,
}
# Content types API Gateway passes as text; every other request body arrives base64-encoded.
_TEXT_TYPES = re.compile(
    r"^(text/[^;]+|application/(json|javascript|xml|[\w.+-]+\+(json|xml)))\s*(;.*)?$", re.IGNORECASE)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

log = logging.getLogger("local_api")


# --------------------------------------------------------------------------------------------- template


class CfnLoader(yaml.SafeLoader):
    """YAML loader that turns CloudFormation short tags (!Ref, !Sub, !GetAtt, ...) into their long form."""


def _intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    name = tag_suffix if tag_suffix == "Condition" else f"Fn::{tag_suffix}"
    return {name: value}


CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path | str = DEFAULT_TEMPLATE) -> dict:
    with open(path, encoding="utf-8") as handle:
        template = yaml.load(handle, Loader=CfnLoader)  # noqa: S506 - CfnLoader is a SafeLoader
    if not isinstance(template, dict) or "Resources" not in template:
        raise ValueError(f"{path} is not a CloudFormation/SAM template")
    return template


def parameter_values(template: Mapping, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parameter defaults and pseudo parameters, as `sam local` resolves them, with overrides on top."""
    values: dict[str, Any] = dict(PSEUDO_PARAMETERS)
    for name, spec in (template.get("Parameters") or {}).items():
        if isinstance(spec, Mapping) and "Default" in spec:
            default = spec["Default"]
            if str(spec.get("Type", "")).startswith("List<") or spec.get("Type") == "CommaDelimitedList":
                default = [item.strip() for item in str(default).split(",")]
            values[name] = default
    values.update(overrides or {})
    return values


class Unresolvable(ValueError):
    pass


def resolve(value: Any, parameters: Mapping[str, Any], conditions: Mapping[str, Any] | None = None) -> Any:
    """Resolve what a local run can know: Ref to parameters, Sub, Join, Select, If/Equals/Not/And/Or.

    Anything that only AWS knows (a resource's Ref or GetAtt, a parameter without a default) raises
    Unresolvable, like `sam local`, which leaves such variables unset.
    """
    conditions = conditions or {}

    def again(item: Any) -> Any:
        return resolve(item, parameters, conditions)

    def condition(name: str) -> bool:
        if name not in conditions:
            raise Unresolvable(f"Condition {name}")
        return bool(again(conditions[name]))

    if isinstance(value, list):
        return [again(item) for item in value]
    if not isinstance(value, Mapping):
        return value
    if len(value) != 1:
        return {key: again(item) for key, item in value.items()}
    (name, argument), = value.items()
    if name == "Ref":
        if argument in parameters:
            return parameters[argument]
        raise Unresolvable(f"Ref {argument}")
    if name == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        scope = {**parameters, **{key: again(item) for key, item in variables.items()}}

        def substitute(match: re.Match) -> str:
            key = match.group(1)
            if key.startswith("!"):
                return "${" + key[1:] + "}"
            if key not in scope:
                raise Unresolvable(f"Sub ${{{key}}}")
            return str(scope[key])

        return re.sub(r"\$\{([^}]+)\}", substitute, text)
    if name == "Fn::Join":
        separator, items = argument
        return separator.join(str(item) for item in again(items))
    if name == "Fn::Select":
        index, items = argument
        return again(items)[int(again(index))]
    if name == "Fn::If":
        name_, if_true, if_false = argument
        return again(if_true if condition(name_) else if_false)
    if name == "Condition":
        return condition(argument)
    if name == "Fn::Equals":
        left, right = again(argument)
        return str(left) == str(right)
    if name == "Fn::Not":
        return not again(argument[0])
    if name == "Fn::And":
        return all(again(item) for item in argument)
    if name == "Fn::Or":
        return any(again(item) for item in argument)
    if name.startswith("Fn::"):
        raise Unresolvable(name)
    return {name: again(argument)}


@dataclass(frozen=True)
class FunctionSpec:
    """What Lambda needs to run one AWS::Serverless::Function."""

    logical_id: str
    code_dir: Path
    handler: str  # "app.lambda_handler"
    layer_dirs: tuple[Path, ...]
    environment: Mapping[str, str]
    memory_mb: int = DEFAULT_MEMORY_MB
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def module_file(self) -> Path:
        module, _, _ = self.handler.rpartition(".")
        return self.code_dir.joinpath(*module.split(".")).with_suffix(".py")

    @property
    def handler_name(self) -> str:
        return self.handler.rpartition(".")[2]


@dataclass(frozen=True)
class Route:
    """One HttpApi route: `METHOD /path/{param}/{proxy+}`; method ANY and path $default are allowed."""

    method: str
    path: str
    function_id: str
    pattern: re.Pattern = field(compare=False, repr=False)

    @classmethod
    def create(cls, method: str, path: str, function_id: str) -> Route:
        method = method.upper()
        if path == "$default":
            return cls(method, path, function_id, re.compile(r"^/.*$"))
        parts = []
        for segment in path.strip("/").split("/"):
            greedy = re.fullmatch(r"\{(\w+)\+\}", segment)
            param = re.fullmatch(r"\{(\w+)\}", segment)
            if greedy:
                parts.append(f"(?P<{greedy.group(1)}>.+)")
            elif param:
                parts.append(f"(?P<{param.group(1)}>[^/]+)")
            else:
                parts.append(re.escape(segment))
        return cls(method, path, function_id, re.compile("^/" + "/".join(parts) + "$"))

    @property
    def route_key(self) -> str:
        return "$default" if self.path == "$default" else f"{self.method} {self.path}"

    @property
    def priority(self) -> tuple:
        """API Gateway picks the most specific route: literals, params, greedy last; methods before ANY."""
        kinds = tuple(2 if s.endswith("+}") else 1 if s.startswith("{") else 0
                      for s in self.path.strip("/").split("/"))
        return (self.path == "$default", 2 in kinds, kinds, self.method == "ANY")

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.method not in ("ANY", method.upper()):
            return None
        found = self.pattern.match(path)
        if found is None:
            return None
        return {name: unquote(value) for name, value in found.groupdict().items()}


def _layer_dir(reference: Any, resources: Mapping, template_dir: Path) -> Path | None:
    """A layer's local content: layers built by `sam build` (BuildMethod) live under /opt/python in Lambda."""
    if not (isinstance(reference, Mapping) and "Ref" in reference):
        log.warning("layer %r is not a local layer; it is skipped", reference)
        return None
    layer = resources.get(reference["Ref"]) or {}
    content = (layer.get("Properties") or {}).get("ContentUri")
    if not isinstance(content, str):
        return None
    directory = (template_dir / content).resolve()
    return directory / "python" if (directory / "python").is_dir() else directory


def parse_functions(template: Mapping, template_dir: Path = ROOT,
                    parameters: Mapping[str, Any] | None = None) -> dict[str, FunctionSpec]:
    parameters = parameter_values(template) if parameters is None else parameters
    conditions = template.get("Conditions") or {}
    resources = template.get("Resources") or {}
    defaults = (template.get("Globals") or {}).get("Function") or {}
    functions = {}
    for logical_id, resource in resources.items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = {**defaults, **(resource.get("Properties") or {})}
        layers = [*(defaults.get("Layers") or []), *((resource.get("Properties") or {}).get("Layers") or [])]
        variables = {
            **((defaults.get("Environment") or {}).get("Variables") or {}),
            **(((resource.get("Properties") or {}).get("Environment") or {}).get("Variables") or {}),
        }
        environment = {}
        for name, value in variables.items():
            try:
                resolved = resolve(value, parameters, conditions)
            except Unresolvable:
                continue  # like sam local: a value only AWS knows is left unset
            if resolved is not None:
                environment[name] = str(resolved)
        layer_dirs = [_layer_dir(layer, resources, template_dir) for layer in layers]
        functions[logical_id] = FunctionSpec(
            logical_id=logical_id,
            code_dir=(template_dir / str(resolve(props.get("CodeUri", "."), parameters))).resolve(),
            handler=str(props.get("Handler", "app.lambda_handler")),
            layer_dirs=tuple(path for path in layer_dirs if path is not None),
            environment=environment,
            memory_mb=int(_resolved_or(props.get("MemorySize"), parameters, DEFAULT_MEMORY_MB)),
            timeout_s=float(_resolved_or(props.get("Timeout"), parameters, DEFAULT_TIMEOUT_S)),
        )
    return functions


def _resolved_or(value: Any, parameters: Mapping[str, Any], default: Any) -> Any:
    if value is None:
        return default
    try:
        return resolve(value, parameters)
    except Unresolvable:
        return default


def parse_routes(template: Mapping) -> list[Route]:
    """Every HttpApi event of every function, most specific first (API Gateway's matching order)."""
    routes = []
    for logical_id, resource in (template.get("Resources") or {}).items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        for event in ((resource.get("Properties") or {}).get("Events") or {}).values():
            if event.get("Type") != "HttpApi":
                continue
            props = event.get("Properties") or {}
            routes.append(Route.create(props.get("Method", "ANY"), props.get("Path", "$default"), logical_id))
    return sorted(routes, key=lambda route: route.priority)


def find_route(routes: Iterable[Route], method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in routes:
        params = route.match(method, path)
        if params is not None:
            return route, params
    return None


# ---------------------------------------------------------------------------------------------- events


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
    raw_path = split.path or "/"
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


def _too_large() -> HttpResponse:
    return error_response(413, "payload_too_large", f"the request body is over {MAX_BODY_BYTES} bytes")


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


# --------------------------------------------------------------------------------------------- runtime


class FunctionRuntime:
    """One function 'container': its module is imported once, on first use (cold start), then reused."""

    _import_lock = threading.Lock()  # sys.path and os.environ are process-wide

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str]):
        self.spec = spec
        self.environment = dict(environment)
        self._module: ModuleType | None = None
        self.init_ms: float | None = None

    @property
    def module(self) -> ModuleType:
        if self._module is None:
            with self._import_lock:
                if self._module is None:
                    self._module = self._import()
        return self._module

    def _import(self) -> ModuleType:
        spec = self.spec
        if not spec.module_file.is_file():
            raise FileNotFoundError(f"{spec.logical_id}: handler module {spec.module_file} does not exist")
        os.environ.update(self.environment)
        # Lambda's order: the function's code (/var/task) first, then the layers (/opt/python).
        for layer in reversed(spec.layer_dirs):
            if str(layer) not in sys.path:
                sys.path.insert(0, str(layer))
        sys.path.insert(0, str(spec.code_dir))
        started = time.perf_counter()
        try:
            module = load_function_module(spec.code_dir, spec.handler)
        finally:
            sys.path.remove(str(spec.code_dir))
        self.init_ms = (time.perf_counter() - started) * 1000
        log.info("%s: cold start, imported %s in %.0f ms", spec.logical_id, spec.module_file, self.init_ms)
        return module

    @property
    def handler(self):
        return getattr(self.module, self.spec.handler_name)

    def new_context(self, request_id: str | None = None) -> LambdaContext:
        return LambdaContext(self.spec.logical_id, memory_mb=self.spec.memory_mb,
                             timeout_seconds=self.spec.timeout_s, request_id=request_id)

    def invoke(self, event: Mapping, request_id: str | None = None) -> Any:
        handler = self.handler
        context = self.new_context(request_id)
        started = time.monotonic()
        result = handler(event, context)
        elapsed = time.monotonic() - started
        if elapsed > self.spec.timeout_s:
            log.warning("%s took %.1f s, over its %.0f s timeout (Lambda would have stopped it)",
                        self.spec.logical_id, elapsed, self.spec.timeout_s)
        # Lambda serialises the result: what JSON cannot hold fails (Runtime.MarshalError), as does > 6 MB.
        payload = json.dumps(result)
        if len(payload) > MAX_RESPONSE_BYTES:
            raise ValueError(f"{self.spec.logical_id} returned {len(payload)} bytes; Lambda's limit is 6 MB")
        return json.loads(payload)


# ---------------------------------------------------------------------------------------------- the API


class LocalApi:
    """template.yaml's HttpApi, served in-process.

    A function's environment: the template's variables (Globals + function) unless the shell already sets
    them, then `environment` (e.g. the local stack's URLs), then `function_environment[logical_id]`.
    """

    def __init__(self, template_path: Path | str = DEFAULT_TEMPLATE, *,
                 environment: Mapping[str, str] | None = None,
                 function_environment: Mapping[str, Mapping[str, str]] | None = None,
                 parameter_overrides: Mapping[str, str] | None = None):
        self.template_path = Path(template_path).resolve()
        self.template = load_template(self.template_path)
        parameters = parameter_values(self.template, parameter_overrides)
        self.functions = parse_functions(self.template, self.template_path.parent, parameters)
        self.routes = parse_routes(self.template)
        self.runtimes: dict[str, FunctionRuntime] = {}
        for logical_id, spec in self.functions.items():
            env = {name: value for name, value in spec.environment.items() if name not in os.environ}
            env.update(AWS_SAM_LOCAL="true", AWS_REGION=os.environ.get("AWS_REGION", LOCAL_REGION))
            env.update(environment or {})
            env.update((function_environment or {}).get(logical_id) or {})
            self.runtimes[logical_id] = FunctionRuntime(spec, env)
        self._openapi: dict | None = None
        self.cors = Cors.from_template(self.template, parameters)

    @property
    def routed_functions(self) -> list[str]:
        return sorted({route.function_id for route in self.routes})

    def warm_up(self) -> None:
        """Import every routed function now (so a broken handler fails at start, not on first request)."""
        for logical_id in self.routed_functions:
            self.runtimes[logical_id].module  # noqa: B018 - importing is the point

    def handle(self, request: HttpRequest) -> HttpResponse:
        response = self._handle(request)
        if self.cors is not None:
            self.cors.apply(request, response)
        return response

    def _handle(self, request: HttpRequest) -> HttpResponse:
        path = urlsplit(request.target).path or "/"
        if request.method == "GET" and path in ("/openapi.json", "/docs"):
            return self._openapi_response() if path == "/openapi.json" else self._docs_response()
        if len(request.body) > MAX_BODY_BYTES:
            return _too_large()
        if self.cors is not None and self.cors.is_preflight(request):
            return HttpResponse(204, [], b"")  # API Gateway answers preflights itself
        found = find_route(self.routes, request.method, path)
        if found is None:
            return error_response(404, "not_found", f"no route for {request.method} {path}")
        route, params = found
        event = build_event(request, route, params)
        runtime = self.runtimes[route.function_id]
        try:
            response = to_http_response(runtime.invoke(event, str(uuid.uuid4())))
        except Exception:
            log.exception("%s failed on %s", route.function_id, route.route_key)
            response = error_response(500, "internal_error", "Internal Server Error")
        response.function_id = route.function_id
        return response

    # ---- OpenAPI and docs

    def openapi(self) -> dict:
        if self._openapi is None:
            self._openapi = self._build_openapi()
        return self._openapi

    def _build_openapi(self) -> dict:
        from infra.openapi import build_openapi  # imports this module: import it late

        self.warm_up()  # each function imported with its own environment, as for a request
        return build_openapi(self.template_path)

    def _openapi_response(self) -> HttpResponse:
        try:
            body = json.dumps(self.openapi(), indent=2).encode()
        except Exception as error:
            log.exception("could not build the OpenAPI document")
            return error_response(500, "internal_error", f"could not build the OpenAPI document: {error}")
        return HttpResponse(200, [("content-type", "application/json")], body)

    def _docs_response(self) -> HttpResponse:
        return HttpResponse(200, [("content-type", "text/html; charset=utf-8")], DOCS_PAGE.read_bytes())

    # ---- serving

    def server(self, host: str = "127.0.0.1", port: int = 3000) -> ThreadingHTTPServer:
        api = self

        class Handler(_RequestHandler):
            local_api = api

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        return server


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


class _RequestHandler(BaseHTTPRequestHandler):
    local_api: LocalApi
    protocol_version = "HTTP/1.1"
    server_version = "candlecast-local-api"

    def _dispatch(self) -> None:
        started = time.perf_counter()
        try:
            body = self._read_body()
        except _BodyTooLarge:
            response = _too_large()
            self.close_connection = True
        except ValueError as error:
            response = error_response(400, "bad_request", str(error))
            self.close_connection = True
        else:
            request = HttpRequest(self.command, self.path, list(self.headers.items()), body,
                                  self.client_address[0], self.request_version)
            response = self.local_api.handle(request)
        self._send(response)
        log.info('"%s %s" %d %.1f ms %s', self.command, self.path, response.status,
                 (time.perf_counter() - started) * 1000, response.function_id)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _BodyTooLarge
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise _BodyTooLarge
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, response: HttpResponse) -> None:
        self.send_response(response.status, HTTPStatus(response.status).phrase
                           if response.status in HTTPStatus._value2member_map_ else "")
        names = set()
        for name, value in response.headers:
            if name in ("content-length", "transfer-encoding", "connection"):
                continue
            names.add(name)
            self.send_header(name, value)
        if "content-type" not in names and response.body:
            self.send_header("content-type", "application/json")
        self.send_header("apigw-requestid", new_request_id())
        self.send_header("content-length", str(len(response.body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


class _BodyTooLarge(Exception):
    pass


def serve_in_thread(api: LocalApi, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the API on a background thread; returns the server (call .shutdown()) and its base URL."""
    server = api.server(host, port)
    threading.Thread(target=server.serve_forever, name="local-api", daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def load_env_file(path: Path | str | None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """A `sam local --env-vars` file: {"Parameters": {...all functions}, "<LogicalId>": {...}}."""
    if not path:
        return {}, {}
    data = json.loads(Path(path).read_text())
    shared = {k: str(v) for k, v in (data.pop("Parameters", None) or {}).items()}
    per_function = {name: {k: str(v) for k, v in values.items()} for name, values in data.items()}
    return shared, per_function




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--env-vars", help="sam local style env.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shared, per_function = load_env_file(args.env_vars)
    api = LocalApi(args.template, environment=shared, function_environment=per_function)
    server = api.server(args.host, args.port)
    url = f"http://{args.host}:{server.server_address[1]}"
    print(f"local API on {url} ({len(api.routes)} routes, docs at {url}/docs); Ctrl-C stops")
    for route in api.routes:
        print(f"  {route.route_key:40} -> {route.function_id}")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
