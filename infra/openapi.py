"""The API's OpenAPI document, generated from the functions' Powertools resolvers (one per function).

    python infra/openapi.py --write    # regenerate infra/openapi.json (`make openapi`)
    python infra/openapi.py --check    # fail if the committed document is out of date

Every function with HttpApi events in template.yaml is imported as Lambda would (infra.lambda_loader);
its resolver's `get_openapi_schema()` gives its paths, and the documents are merged into one. The local
API serves the result at /openapi.json with a /docs page.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, get_args

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from candlecast.timeframes import Timeframe  # noqa: E402
from infra.lambda_loader import load_function_module  # noqa: E402
from infra.sam_template import load_template, parameter_values, parse_functions, parse_routes  # noqa: E402

DOCUMENT = ROOT / "infra/openapi.json"
SCHEMAS_PREFIX = "#/components/schemas/"
TITLE = "candlecast"
VERSION = "1.0.0"
# Importing a handler validates configuration; these stand-ins let it import without the stack (here, and tests).
STAND_IN_ENVIRONMENT = {
    "DATABASE_URL": "postgresql://candlecast@127.0.0.1:9/candlecast",
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "DATA_BUCKET": "candlecast-openapi",
}


class OpenApiConflict(ValueError):
    pass


def _merge_into(target: dict[str, Any], items: dict[str, Any], what: str) -> None:
    for name, value in items.items():
        if name in target and target[name] != value:
            raise OpenApiConflict(f"two functions define {what} {name!r} differently")
        target[name] = value


_DEFAULT_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _drop_default_validation_responses(paths: dict[str, dict], schemas: dict[str, Any]) -> None:
    """Powertools documents a 422 HTTPValidationError on every route with parameters; ours answer bad
    parameters with 400 and the one error body the routes declare, so that default is removed."""
    for operations in paths.values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(response):
                del operation["responses"]["422"]
    if "HTTPValidationError" not in json.dumps(paths):
        for name in _DEFAULT_VALIDATION_SCHEMAS:
            schemas.pop(name, None)


def _referenced(paths: dict[str, dict], schemas: dict[str, Any]) -> dict[str, Any]:
    """The schemas that the paths reach, directly or through other schemas (Powertools adds some that
    nothing uses, such as ResponseValidationError, whose own reference we dropped above)."""
    prefix = SCHEMAS_PREFIX
    reached: dict[str, Any] = {}
    pending = [paths]
    while pending:
        for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(pending.pop())):
            if ref.removeprefix(HEADERS_PREFIX) in SHARED_HEADERS:
                continue
            name = ref.removeprefix(prefix)
            if not ref.startswith(prefix) or name not in schemas:
                raise OpenApiConflict(f"{ref} refers to no schema")
            if name not in reached:
                reached[name] = schemas[name]
                pending.append(schemas[name])
    return reached


GATEWAY_MESSAGE = {
    "title": "GatewayMessage",
    "description": "An answer from API Gateway itself, not from candlecast: its own body, which an HTTP API cannot "
                   "change.",
    "type": "object",
    "properties": {"message": {"type": "string", "title": "Message", "examples": ["Too Many Requests"]}},
    "required": ["message"],
}


def _add_throttle_responses(paths: dict[str, dict], template: dict, schemas: dict[str, Any]) -> None:
    """The 429 API Gateway answers on each route that template.yaml gives a throttle (RouteSettings)."""
    parameters = parameter_values(template)
    for route in parse_routes(template, parameters):
        operation = paths.get(route.path, {}).get(route.method.lower())
        if route.throttle is None or operation is None:
            continue
        operation.setdefault("responses", {})["429"] = {
            "description": (
                f"Too many requests: API Gateway's throttle on this route (by default {route.throttle.rate:g} "
                f"per second, bursts of {route.throttle.burst}) answered without running the function, so "
                "nothing was done. The body is API Gateway's own and there is no Retry-After header: retry "
                f"after about {1 / route.throttle.rate:g} s, backing off exponentially with jitter."
                if route.throttle.rate > 0 else "Too many requests: API Gateway's throttle on this route."),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GatewayMessage"}}},
        }
        schemas["GatewayMessage"] = GATEWAY_MESSAGE


CACHE_CONTROL = {
    "description": "How long a client or a shared cache may keep this answer: `public, max-age=N` (or `private` for "
                   "a prediction) on reads the server caches itself, `no-store` on errors, creates and health.",
    "schema": {"type": "string", "examples": ["public, max-age=300", "no-store"]},
}
RETRY_AFTER = {"description": "Seconds to wait before trying again.", "schema": {"type": "integer", "minimum": 1}}
HEADERS_PREFIX = "#/components/headers/"
SHARED_HEADERS = {"Cache-Control": CACHE_CONTROL, "Retry-After": RETRY_AFTER}
OURS_OR_GATEWAYS = {"anyOf": [{"$ref": f"{SCHEMAS_PREFIX}ErrorResponse"}, {"$ref": f"{SCHEMAS_PREFIX}GatewayMessage"}]}
FAILED_FUNCTION = {
    "description": "The function failed: candlecast's own `internal_error` answer to an error it did not expect, or "
                   "API Gateway's (`message`) when the function crashed, timed out or Lambda refused the invocation. "
                   "Whether it was done is unknown (a create may have been stored); retry with backoff, a create "
                   "with its Idempotency-Key.",
    "content": {"application/json": {"schema": OURS_OR_GATEWAYS}},
}
NO_ROUTE = ("; or API Gateway's own `Not Found` (`message`) when the path matches no route, as it does when a path "
            "parameter is empty or holds an encoded slash")


def _add_gateway_errors_and_headers(paths: dict[str, dict], schemas: dict[str, Any]) -> None:
    """What every function answer carries and the resolvers do not declare: Cache-Control on each, Retry-After on
    a 503; the 500 of a function that failed, and API Gateway's 404 where a path parameter can match no route."""
    for operations in paths.values():
        for operation in operations.values():
            if any(parameter.get("in") == "path" for parameter in operation.get("parameters", [])):
                not_found = operation.setdefault("responses", {}).setdefault("404", {"description": "Not found"})
                not_found["description"] = not_found["description"].rstrip(".") + NO_ROUTE
                json_content = not_found.setdefault("content", {}).setdefault("application/json", {})
                json_content["schema"] = OURS_OR_GATEWAYS
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status == "429":  # API Gateway's own: no headers of ours
                    continue
                headers = response.setdefault("headers", {})
                headers.setdefault("Cache-Control", {"$ref": f"{HEADERS_PREFIX}Cache-Control"})
                if status == "503":
                    headers.setdefault("Retry-After", {"$ref": f"{HEADERS_PREFIX}Retry-After"})
            responses["500"] = FAILED_FUNCTION
    schemas["GatewayMessage"] = GATEWAY_MESSAGE


def _open_enum(node: Any) -> Any:
    """`node` with each string enum made open: its known values, or any other string (a value added later)."""
    if isinstance(node, list):
        return [_open_enum(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "enum" in node and all(isinstance(value, str) for value in node["enum"]):
        known = {"type": "string", "enum": node["enum"]}
        rest = {key: value for key, value in node.items() if key not in ("type", "enum")}
        return rest | {"anyOf": [known, {"type": "string"}]}
    return {key: _open_enum(value) for key, value in node.items()}


def _open_response_enums(paths: dict[str, dict], schemas: dict[str, Any]) -> None:
    """Response fields may gain values (API_DESCRIPTION), so their enums are open: a client generated from the
    document reads a new status as a string rather than failing on the answer. What requests carry (bodies,
    parameters) stays closed: the server refuses other values."""
    requests = {"/": [operation.get(part) for operations in paths.values() for operation in operations.values()
                      for part in ("requestBody", "parameters")]}
    request_schemas = set(_referenced(requests, schemas))
    for name in schemas:
        if name not in request_schemas:
            schemas[name] = _open_enum(schemas[name])
    for operations in paths.values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                if "headers" in response:
                    response["headers"] = _open_enum(response["headers"])


TIMEFRAME = {
    "title": "Timeframe",
    "description": "1h, 4h, 1d, 1w or 1m (1m = one calendar month)",
    "type": "string",
    "enum": list(get_args(Timeframe)),
    "x-enum-varnames": ["ONE_HOUR", "FOUR_HOURS", "ONE_DAY", "ONE_WEEK", "ONE_MONTH"],  # names in generated clients
}


def _shared_timeframe(node: Any) -> Any:
    """`node` with each enum of the timeframes a reference to one Timeframe schema: a generated client gets one
    type, which a response's value can be passed back in, instead of one per field with members VALUE_0..4."""
    if isinstance(node, list):
        return [_shared_timeframe(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("enum") == TIMEFRAME["enum"]:
        rest = {key: value for key, value in node.items() if key not in ("type", "enum", "title")}
        return {"$ref": f"{SCHEMAS_PREFIX}Timeframe"} | rest
    return {key: _shared_timeframe(value) for key, value in node.items()}


def build_openapi(template_path: Path | str = ROOT / "template.yaml") -> dict[str, Any]:
    """One OpenAPI 3.1 document from the resolvers of every function that has HttpApi routes."""
    from candlecast.api import API_DESCRIPTION

    template = load_template(template_path)
    routed = sorted({route.function_id for route in parse_routes(template)})
    specs = parse_functions(template, Path(template_path).resolve().parent)
    paths: dict[str, dict] = {}
    schemas: dict[str, Any] = {}
    openapi_version = "3.1.0"
    for logical_id in routed:
        spec = specs[logical_id]
        module = load_function_module(spec.code_dir, spec.handler)
        document = module.app.get_openapi_schema(title=TITLE, version=VERSION).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        openapi_version = document.get("openapi", openapi_version)
        for path, operations in document.get("paths", {}).items():
            _merge_into(paths.setdefault(path, {}), operations, f"operation on {path}")
        _merge_into(schemas, document.get("components", {}).get("schemas", {}), "schema")
    _drop_default_validation_responses(paths, schemas)
    _add_throttle_responses(paths, template, schemas)
    _add_gateway_errors_and_headers(paths, schemas)
    schemas = _referenced(paths, schemas)
    _open_response_enums(paths, schemas)
    paths, schemas = _shared_timeframe(paths), _shared_timeframe(schemas) | {"Timeframe": TIMEFRAME}
    merged: dict[str, Any] = {
        "openapi": openapi_version,
        "info": {"title": TITLE, "version": VERSION, "description": API_DESCRIPTION},
        "paths": {path: dict(sorted(paths[path].items())) for path in sorted(paths)},
    }
    if schemas:
        merged["components"] = {"schemas": dict(sorted(schemas.items()))}
    merged.setdefault("components", {})["headers"] = SHARED_HEADERS
    return merged


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    for name, value in STAND_IN_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    wanted = render(build_openapi())
    if args.write:
        DOCUMENT.write_text(wanted)
        print(f"wrote {DOCUMENT.relative_to(ROOT)}")
        return 0
    if not DOCUMENT.exists() or DOCUMENT.read_text() != wanted:
        print(f"{DOCUMENT.relative_to(ROOT)} is out of date: run `make openapi`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
