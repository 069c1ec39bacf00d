"""Our Docker-free `sam local start-api`: template.yaml's HttpApi served on one port.

For each HTTP request it builds the API Gateway HTTP API payload format 2.0 event (infra.apigateway) for the
route template.yaml gives (infra.sam_template), runs that function's handler (infra.lambda_runtime), and
turns the result back into HTTP as API Gateway does; infra.http_server speaks HTTP. Routes the template does
not have are local extras: /openapi.json, /docs (Powertools' Swagger UI, infra.swagger_docs), the forecast page
at / (infra.forecast_page), and whatever `add_local_route` adds (infra.static_files).

    python -m infra.local_api --port 3000      # needs DATABASE_URL, REDIS_URL, DATA_BUCKET, ... set
    python -m infra.run_local --port 3000      # starts the local stack first (that is `make run`)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.apigateway import (
    MAX_BODY_BYTES,
    Cors,
    HttpRequest,
    HttpResponse,
    TokenBucket,
    build_event,
    error_response,
    gateway_path,
    gateway_response,
    invoke_refused,
    throttled_by_route,
    to_http_response,
    too_large,
)
from infra.concurrency import budgets
from infra.forecast_page import add_page_routes
from infra.http_server import LocalHttpServer, make_server
from infra.http_server import serve_in_thread as serve_on_thread
from infra.lambda_runtime import DEFAULT_MAX_CONTAINERS, FunctionError, FunctionRuntime, Throttled
from infra.sam_template import (
    DEFAULT_TEMPLATE,
    LOCAL_REGION,
    Route,
    find_route,
    load_template,
    parameter_values,
    parse_functions,
    parse_routes,
)
from infra.static_files import LocalHandler
from infra.swagger_docs import swagger_ui

log = logging.getLogger("local_api")
# With report_waits: how long a request waited for a free container, a local economy AWS does not have
# (make faults takes it out of a request's time).
WAIT_HEADER = "x-local-container-wait-ms"


class LocalApi:
    """template.yaml's HttpApi, plus local extras.

    A function's environment: the template's variables (Globals + function) unless the shell already sets
    them, then `environment` (e.g. the local stack's URLs), then `function_environment[logical_id]`.
    `body_limit` refuses larger bodies before they are read (API Gateway's is 10 MB). Each function runs in
    its own containers (infra.lambda_runtime), at most `max_containers` of them; `close()` stops them.
    As on AWS, each route's throttle (RouteSettings) answers 429 when its bucket is empty, and an invoke past a
    function's reserved concurrency is refused (a 500); `route_throttles=False` / `reserved_concurrency=False`
    turn either off, for runs whose load is not sized to the template's capacity.
    """

    def __init__(self, template_path: Path | str = DEFAULT_TEMPLATE, *,
                 environment: Mapping[str, str] | None = None,
                 function_environment: Mapping[str, Mapping[str, str]] | None = None,
                 parameter_overrides: Mapping[str, str] | None = None,
                 body_limit: int = MAX_BODY_BYTES, max_containers: int = DEFAULT_MAX_CONTAINERS,
                 route_throttles: bool = True, reserved_concurrency: bool = True, report_waits: bool = False):
        self.template_path = Path(template_path).resolve()
        self.template = load_template(self.template_path)
        parameters = parameter_values(self.template, parameter_overrides)
        self.functions = parse_functions(self.template, self.template_path.parent, parameters)
        self.routes = parse_routes(self.template, parameters)
        self.buckets = {route.route_key: TokenBucket(route.throttle) for route in self.routes
                        if route_throttles and route.throttle is not None}
        if route_throttles and reserved_concurrency:
            for budget in budgets(self.template, parameters, self.template_path.parent):
                if budget.problem:
                    log.warning("%s: %s; API Gateway would answer the overflow with 500", budget.function_id,
                                budget.problem)
        self.body_limit = body_limit
        self.report_waits = report_waits
        self.runtimes: dict[str, FunctionRuntime] = {}
        for logical_id, spec in self.functions.items():
            if not reserved_concurrency:
                spec = dataclasses.replace(spec, reserved_concurrency=None)
            env = {name: value for name, value in spec.environment.items() if name not in os.environ}
            env.update(AWS_SAM_LOCAL="true", AWS_REGION=os.environ.get("AWS_REGION", LOCAL_REGION))
            env.update(environment or {})
            env.update((function_environment or {}).get(logical_id) or {})
            self.runtimes[logical_id] = FunctionRuntime(spec, env, max_containers=max_containers)
        self._openapi: dict | None = None
        self.cors = Cors.from_template(self.template, parameters)
        self.local_routes: list[tuple[Route, LocalHandler]] = []
        self.add_local_route("GET", "/openapi.json", lambda _request, _params: self._openapi_response())
        self.add_local_route("GET", "/docs", swagger_ui(self.openapi))
        add_page_routes(self)

    def add_local_route(self, method: str, path: str, handler: LocalHandler) -> None:
        """Serve `METHOD /path/{param}/{rest+}` from this process, ahead of the template's routes; a second
        handler for the same route replaces the first (the built-in page and docs can be swapped)."""
        route = Route.create(method, path, "local")
        self.local_routes = [item for item in self.local_routes
                             if (item[0].method, item[0].path) != (route.method, route.path)]
        self.local_routes.append((route, handler))
        self.local_routes.sort(key=lambda item: item[0].priority)

    @property
    def routed_functions(self) -> list[str]:
        return sorted({route.function_id for route in self.routes})

    def warm_up(self, containers: int = 1) -> None:
        """Start `containers` containers of every routed function now, side by side (a broken handler fails here)."""
        with ThreadPoolExecutor(len(self.routed_functions) or 1) as pool:
            for started in [pool.submit(self.runtimes[name].warm_up, containers) for name in self.routed_functions]:
                started.result()

    def close(self) -> None:
        """Stop every container."""
        for runtime in self.runtimes.values():
            runtime.close()

    def handle(self, request: HttpRequest) -> HttpResponse:
        response = self._handle(request)
        if self.cors is not None:
            self.cors.apply(request, response)
        return response

    def _handle(self, request: HttpRequest) -> HttpResponse:
        path = gateway_path(request.target)
        for route, handler in self.local_routes:
            params = route.match(request.method, path)
            if params is not None:
                return handler(request, params)
        if len(request.body) > self.body_limit:
            return too_large(self.body_limit)
        if self.cors is not None and self.cors.is_preflight(request):
            return HttpResponse(204, [], b"")  # API Gateway answers preflights itself
        found = find_route(self.routes, request.method, path)
        if found is None:
            return gateway_response(404, "Not Found")  # API Gateway answers a route it does not have itself
        route, params = found
        bucket = self.buckets.get(route.route_key)
        if bucket is not None and not bucket.take():
            response = throttled_by_route()
            response.function_id = f"{route.function_id} (route throttle)"
            return response
        event = build_event(request, route, params)
        runtime = self.runtimes[route.function_id]
        waited: list[float] = []
        try:
            response = to_http_response(runtime.invoke(event, str(uuid.uuid4()), waited))
        except Throttled as error:
            log.warning("%s", error)
            response = invoke_refused()
        except FunctionError as error:
            log.error("%s failed on %s: %s", route.function_id, route.route_key, error)
            response = gateway_response(500, "Internal Server Error")  # a crashed invoke: API Gateway's own 500
        except Exception:
            log.exception("%s failed on %s", route.function_id, route.route_key)
            response = gateway_response(500, "Internal Server Error")
        response.function_id = route.function_id
        if self.report_waits and waited:
            response.headers.append((WAIT_HEADER, f"{waited[0] * 1000:.1f}"))
        return response

    # ---- OpenAPI

    def openapi(self) -> dict:
        if self._openapi is None:
            from infra.openapi import build_openapi

            self._openapi = build_openapi(self.template_path)
        return self._openapi

    def _openapi_response(self) -> HttpResponse:
        try:
            body = json.dumps(self.openapi(), indent=2).encode()
        except Exception as error:
            log.exception("could not build the OpenAPI document")
            return error_response(500, "internal_error", f"could not build the OpenAPI document: {error}")
        return HttpResponse(200, [("content-type", "application/json")], body)

    # ---- serving

    def refuse_too_large(self, request: HttpRequest) -> HttpResponse:
        """A request whose body is over `body_limit`, refused from its Content-Length without reading it, answered
        as on AWS: API Gateway's 404 for a path it has no route for, else the function's 413 (no-store); with the
        CORS headers either way, so a browser sees the answer rather than a network error."""
        if find_route(self.routes, request.method, gateway_path(request.target)) is None:
            response = gateway_response(404, "Not Found")
        else:
            response = too_large(self.body_limit)
            response.headers.append(("cache-control", "no-store"))
        if self.cors is not None:
            self.cors.apply(request, response)
        return response

    def server(self, host: str = "127.0.0.1", port: int = 3000, bound: socket.socket | None = None) -> LocalHttpServer:
        """Serving on `host`:`port`, or on a socket already bound (infra.http_server.bind)."""
        return make_server(self.handle, host, port, body_limit=self.body_limit, on_close=self.close, bound=bound,
                           refuse_too_large=self.refuse_too_large)


def serve_in_thread(api: LocalApi, host: str = "127.0.0.1", port: int = 0) -> tuple[LocalHttpServer, str]:
    """Start the API on a background thread; returns the server (call .shutdown()) and its base URL."""
    server = api.server(host, port)
    return server, serve_on_thread(server)


def load_env_file(path: Path | str | None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """A `sam local --env-vars` file: {"Parameters": {...all functions}, "<LogicalId>": {...}}."""
    if not path:
        return {}, {}
    data = json.loads(Path(path).read_text())
    shared = {k: str(v) for k, v in (data.pop("Parameters", None) or {}).items()}
    per_function = {name: {k: str(v) for k, v in values.items()} for name, values in data.items()}
    return shared, per_function


def log_to(stream, fmt: str) -> None:
    """INFO lines stamped in UTC with the offset, as the functions' own (Powertools) lines are."""
    formatter = logging.Formatter(fmt)
    formatter.converter = time.gmtime
    formatter.default_msec_format = "%s,%03d+0000"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--env-vars", help="sam local style env.json")
    parser.add_argument("--max-containers", type=int, default=DEFAULT_MAX_CONTAINERS,
                        help="containers per function at most (its reserved concurrency caps them too)")
    parser.add_argument("--warm", type=int, default=0, metavar="N",
                        help="start N containers of every routed function before serving (provisioned concurrency)")
    parser.add_argument("--parameter-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="template parameters, as for sam local")
    parser.add_argument("--no-route-throttles", action="store_true",
                        help="let every request through to its function (no 429 from the routes' throttles)")
    parser.add_argument("--no-reserved-concurrency", action="store_true",
                        help="never refuse an invoke for its function's reserved concurrency (no such 500)")
    parser.add_argument("--report-waits", action="store_true",
                        help=f"answer with {WAIT_HEADER}: ms the request waited for a free container (local only)")
    args = parser.parse_args(argv)
    log_to(sys.stderr, "%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the containers on SIGTERM too
    shared, per_function = load_env_file(args.env_vars)
    overrides = dict(item.split("=", 1) for item in args.parameter_overrides)
    api = LocalApi(args.template, environment=shared, function_environment=per_function,
                   parameter_overrides=overrides, max_containers=args.max_containers,
                   route_throttles=not args.no_route_throttles,
                   reserved_concurrency=not args.no_reserved_concurrency, report_waits=args.report_waits)
    if args.warm:
        api.warm_up(args.warm)
    server = api.server(args.host, args.port)
    url = f"http://{args.host}:{server.server_address[1]}"
    print(f"local API on {url} ({len(api.routes)} routes, docs at {url}/docs); Ctrl-C stops")
    for route in api.routes:
        print(f"  {route.route_key:40} -> {route.function_id:26} {route.throttle or 'no throttle'}")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()  # and the containers


if __name__ == "__main__":
    main()
