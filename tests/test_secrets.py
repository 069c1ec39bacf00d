"""The secrets canary: canary values for the database password, the model signing key and the Polygon key;
an upstream that echoes everything it is sent; every route called, failing ones included (bad input,
upstream refusals, the database and the cache frozen). No response and no log line may hold a canary."""

import base64
import json
import signal
import time
from urllib.parse import quote

import httpx
import psycopg
import pytest

from infra.served_stack import ServedStack, signal_all
from tests.fake_polygon import FakePolygon, FakeSymbol, make_market

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CANARIES = {
    "database password": "canary-db-pass-Q7x2w",
    "signing key": "canary-signing-key-F93kz",
    "Polygon key": "canary-polygon-key-T48mv",
}


def variants(secret: str) -> set[str]:
    """The forms a secret could leak in: as is, percent-encoded, base64 (as in a Basic header)."""
    return {secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode().rstrip("=")}


def canary_hits(texts: list[tuple[str, str]], log_lines: list[str]) -> list[str]:
    """Each canary form found in a (where, text) pair or a log line, described for the failure message."""
    hits = []
    for name, secret in CANARIES.items():
        for form in variants(secret):
            hits += [f"{name} in {where}" for where, text in texts if form in text]
            hits += [f"{name} in log line {number}: {line[:200]}" for number, line in enumerate(log_lines, 1)
                     if form in line]
    return hits


@pytest.fixture(scope="module")
def upstream():
    market = make_market(6, now=int(time.time()))
    # The sample's stored candles end in 2021: a catch-up that finds nothing newer is a 404 candles_stopped.
    market.symbols.append(FakeSymbol("X:BTCUSDT", "BTC", "USDT", "Bitcoin - Tether", price=30_000.0))
    with FakePolygon(market, api_key=CANARIES["Polygon key"]) as fake:
        fake.echo = True
        fake.add_fault("/v2/aggs/ticker/X:C001USD/", status=401, times=100)
        fake.add_fault("/v2/aggs/ticker/X:C002USD/", status=403, times=100)
        fake.add_fault("/v2/aggs/ticker/X:C003USD/", status=404, times=100)
        fake.add_fault("/v2/aggs/ticker/X:C004USD/", status=500, times=100)
        fake.add_fault("/v2/aggs/ticker/X:C005USD/", kind="malformed", times=100)
        yield fake


@pytest.fixture(scope="module")
def served(upstream):
    environment = {"MODEL_SIGNING_KEY": CANARIES["signing key"], "POLYGON_API_KEY": CANARIES["Polygon key"],
                   "POLYGON_BASE_URL": upstream.url, "POWERTOOLS_LOG_LEVEL": "DEBUG"}
    # Every route, several times in a row: the routes' throttles would answer some with their own 429.
    with ServedStack(environment=environment, database_password=CANARIES["database password"],
                     api_args=["--no-route-throttles"]) as stack:
        with psycopg.connect(stack.stack.database_url, autocommit=True) as conn:  # symbols with no stored candles
            for index in range(6):
                conn.execute(
                    "INSERT INTO symbols (ticker, name, base_currency, quote_currency, market, volume_24h) "
                    "VALUES (%s, %s, %s, 'USD', 'crypto', 1) ON CONFLICT DO NOTHING",
                    (f"X:C{index:03d}USD", f"Coin {index:03d}", f"C{index:03d}"))
        yield stack


def every_route(client: httpx.Client, served: ServedStack) -> list[httpx.Response]:
    responses = []

    def call(method: str, path: str, **kwargs) -> httpx.Response:
        response = client.request(method, path, **kwargs)
        responses.append(response)
        return response

    call("GET", "/health")
    call("GET", "/openapi.json")
    call("GET", "/docs")
    for path in ("/symbols?q=btc", "/symbols?q=coin", "/symbols/top?limit=3", "/symbols/X:BTCUSDT",
                 "/symbols/X:BTCUSDT/predictions", "/symbols/X:NOPEUSD", "/symbols/BTCUSDT%0A-",
                 "/symbols?limit=" + "9" * 5000, "/predictions/not-a-uuid",
                 "/predictions/00000000-0000-0000-0000-000000000000", "/nowhere", "/models", "/models/1h",
                 "/models/2h"):
        call("GET", path)
    created = call("POST", "/predictions", json={"symbol": "BTCUSDT", "timeframe": "1h"})
    assert created.status_code == 201, created.text  # the models verify under the canary key
    call("GET", f"/predictions/{created.json()['id']}")
    call("POST", "/predictions", json={"symbol": "BTCUSDT", "timeframe": "1h"})  # the repeat
    call("POST", "/predictions", json={"symbol": "ETHUSDT", "timeframe": "4h"}, headers={"Idempotency-Key": "k-1"})
    call("POST", "/predictions", json={"symbol": "SOLUSDT", "timeframe": "4h"}, headers={"Idempotency-Key": "k-1"})
    fetched = call("POST", "/predictions", json={"symbol": "X:C000USD", "timeframe": "1h"})
    assert fetched.status_code == 201, fetched.text  # from the echoing upstream
    for index in range(1, 6):  # refused, missing, failing, malformed: twice (the second is remembered)
        for _ in range(2):
            failed = call("POST", "/predictions", json={"symbol": f"X:C{index:03d}USD", "timeframe": "4h"})
            assert failed.status_code in (404, 503), failed.text
    for body, content_type in (('{"symbol": "BTCUSDT", "timeframe": "1h", "symbol": "X"}', "application/json"),
                               ('{"symbol": 1e999, "timeframe": "1h"}', "application/json"),
                               ("{" * 20_000, "application/json"), ("symbol=BTCUSDT", "text/plain")):
        call("POST", "/predictions", content=body, headers={"content-type": content_type})

    # The database frozen, then the cache: the failing paths log the most.
    pids = served.postgres_pids()
    signal_all(pids, signal.SIGSTOP)
    try:
        for path in ("/health", "/symbols/X:ETHUSDT", "/symbols/top?limit=7", "/symbols?q=zz"):
            call("GET", path)
        call("POST", "/predictions", json={"symbol": "ETHUSDT", "timeframe": "1h"})
    finally:
        signal_all(pids, signal.SIGCONT)
    redis = served.redis_process()
    redis.send_signal(signal.SIGSTOP)
    try:
        call("GET", "/health")
        call("GET", "/symbols/X:SOLUSDT")
        call("POST", "/predictions", json={"symbol": "SOLUSDT", "timeframe": "1d"})
    finally:
        redis.send_signal(signal.SIGCONT)
    return responses


def test_no_secret_reaches_a_response_or_a_log_line(served, upstream):
    with httpx.Client(base_url=served.base_url, timeout=30) as client:
        responses = every_route(client, served)
    time.sleep(0.5)  # the API's last log lines
    log_lines = served.api_log.read_text(errors="replace").splitlines()
    texts = [(f"the response to {r.request.method} {r.request.url.path} -> {r.status_code}",
              json.dumps(dict(r.headers)) + "\n" + r.text) for r in responses]
    hits = canary_hits(texts, log_lines)
    # The canaries were really in play: the upstream got the key and echoed it; failures were logged.
    assert upstream.requests and not upstream.bad_auth  # every call carried the canary key, and was echoed
    assert upstream.count("/v2/aggs/ticker/X:C001USD/") >= 1 and upstream.count("/v2/aggs/ticker/X:C000USD/") >= 1
    statuses = sorted({r.status_code for r in responses})
    assert {200, 201, 400, 404, 503} <= set(statuses)
    print(f"\nsecrets canary: {len(responses)} responses (statuses {statuses}), {len(log_lines)} log lines, "
          f"{len(CANARIES)} canaries in {sum(len(variants(s)) for s in CANARIES.values())} forms: "
          f"{len(hits)} hits")
    assert hits == [], "\n".join(hits[:20])


def test_no_secret_reaches_the_batch_functions_logs_or_answers(served, upstream, capfd):
    """Migrate, Score, Retention and Refresh, run as the local API runs a function (a container with the
    template's environment and the canaries), on their scheduled and deploy-time events, failing ones
    included: a migrations folder that is missing, a database that refuses connections."""
    from infra.artifacts import ResponseCapture
    from infra.lambda_runtime import FunctionError, FunctionRuntime
    from infra.local_api import LocalApi
    from infra.local_stack import free_port
    from tests.conftest import EVENTS, ROOT

    unreachable = f"postgresql://postgres:{quote(CANARIES['database password'])}@127.0.0.1:{free_port()}/candlecast"
    api = LocalApi(ROOT / "template.yaml", environment=served.env(), function_environment={
        "MigrateFunction": {"MIGRATIONS_DIR": str(ROOT / "migrations")},
        "RefreshFunction": {"SCORE_FUNCTION_NAME": "", "REFRESH_CHAIN": "false"},  # scoring inline, no chain
    })
    cfn = ResponseCapture()
    create = {**json.loads((EVENTS / "migrate_create.json").read_text()), "ResponseURL": cfn.url}
    scheduled = {name: json.loads((EVENTS / f"{name}_scheduled.json").read_text())
                 for name in ("score", "retention", "refresh")}
    runs = [  # (function, environment changes, event)
        ("MigrateFunction", {}, {"action": "apply"}),
        ("MigrateFunction", {}, {"action": "status"}),
        ("MigrateFunction", {}, create),
        ("MigrateFunction", {"MIGRATIONS_DIR": "/nonexistent/migrations"}, {"action": "apply"}),
        ("MigrateFunction", {"MIGRATIONS_DIR": "/nonexistent/migrations"}, create),
        ("MigrateFunction", {"DATABASE_URL": unreachable}, create),
        ("ScoreFunction", {}, scheduled["score"]),
        ("ScoreFunction", {"DATABASE_URL": unreachable}, scheduled["score"]),
        ("RetentionFunction", {}, scheduled["retention"]),
        ("RetentionFunction", {"DATABASE_URL": unreachable}, scheduled["retention"]),
        ("RefreshFunction", {}, scheduled["refresh"]),
    ]
    answers: list[tuple[str, str]] = []
    outcomes = []
    asked_before = len(upstream.requests)
    try:
        for function, changes, event in runs:
            base = api.runtimes[function]
            runtime = FunctionRuntime(base.spec, {**base.environment, **changes})
            where = f"{function} {json.dumps(changes)} {event.get('action') or event.get('RequestType') or 'scheduled'}"
            try:
                answers.append((where, json.dumps(runtime.invoke(event, "canary"))))
                outcomes.append("ok")
            except FunctionError as error:  # what Lambda returns to the caller and logs
                answers.append((where, str(error)))
                outcomes.append("error")
            finally:
                runtime.close()
    finally:
        cfn.close()
    answers += [(f"CloudFormation response {index}", json.dumps(body)) for index, body in enumerate(cfn.captured)]
    output = capfd.readouterr()
    log_lines = (output.out + output.err).splitlines()
    hits = canary_hits(answers, log_lines)
    # The runs were real: the failing ones failed, the others worked, CloudFormation heard of every Create,
    # and the refresh asked the echoing upstream with the canary key.
    # A failed Create still answers (FAILED); the refresh stops at the upstream's refusal of the key.
    expected = ["ok", "ok", "ok", "error", "ok", "ok", "ok", "error", "ok", "error", "error"]
    assert outcomes == expected, "\n".join(f"{where}: {text[:600]}" for where, text in answers)
    assert [body["Status"] for body in cfn.captured] == ["SUCCESS", "FAILED", "FAILED"]
    assert "PolygonAuthError" in answers[10][1]
    for function in ("MigrateFunction", "ScoreFunction", "RetentionFunction", "RefreshFunction"):
        assert any(f'"function_name":"{function}"' in line for line in log_lines), f"no log line of {function}"
    assert len(upstream.requests) > asked_before and not upstream.bad_auth
    with capfd.disabled():
        print(f"\nsecrets canary, batch functions: {len(runs)} invokes ({outcomes.count('error')} failing), "
              f"{len(cfn.captured)} CloudFormation answers, {len(log_lines)} log lines: {len(hits)} hits")
    assert hits == [], "\n".join(hits[:20])
