"""What an operator sees of a request: its metrics' dimensions, its logs' correlation id, one line per cause."""

import io
import json
import logging

import pytest

from infra.events import path_event
from tests.conftest import invoke, load_event

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _env(app_env):
    yield


def emf_blobs(text: str) -> list[dict]:
    """The CloudWatch embedded-metric-format records among the lines printed to stdout."""
    blobs = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "_aws" in record:
            blobs.append(record)
    return blobs


def test_response_metrics_carry_the_stage_and_the_function_as_dimensions(capsys):
    """Responses2xx/4xx/5xx had the dimension `service` only: every function of every stage summed into one
    series, so dev's 5xx and prod's could not be told apart, nor Health's from PredictionCreate's."""
    capsys.readouterr()
    status, _, _ = invoke("health", path_event("health.json", "/no-such-route"))
    assert status == 404
    (blob,) = [blob for blob in emf_blobs(capsys.readouterr().out) if "Responses4xx" in blob]
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    # `service` comes from POWERTOOLS_SERVICE_NAME as the process had it when the metrics object was made (the
    # template sets it for every function; a test that imported the module earlier may not have).
    (dimensions,) = [set(each) for each in directive["Dimensions"]]
    assert {"function", "stage"} <= dimensions <= {"function", "service", "stage"}
    assert (blob["stage"], blob["function"]) == ("local", "health")


LAMBDA_LEVELS = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]


def test_the_metric_lines_pass_lambdas_log_level_filter_at_every_allowed_log_level(capsys):
    """Audit: LogLevel WARNING or ERROR set Lambda's application level filter to WARN or ERROR, and Lambda takes a
    JSON line without a "level" as INFO: the metric lines, which have none, were dropped, and every custom
    metric and the alarms on them with them."""
    from infra import template_checks

    capsys.readouterr()
    invoke("health", path_event("health.json", "/no-such-route"))
    blobs = emf_blobs(capsys.readouterr().out)
    assert blobs
    line_levels = {str(blob.get("level", "INFO")).upper() for blob in blobs}  # Lambda's reading of them
    template = template_checks.load_template()
    for log_level in template["Parameters"]["LogLevel"]["AllowedValues"]:
        allowed = template["Mappings"]["LambdaLogLevels"][log_level]["Level"]
        for level in line_levels:
            assert LAMBDA_LEVELS.index(level) >= LAMBDA_LEVELS.index(allowed), (log_level, level)


def test_every_line_a_request_logs_carries_api_gateways_request_id():
    """inject_lambda_context had no correlation_id_path: a request's log lines had no id that its access-log line
    (requestId) also has, so a 5xx in the access log could not be joined with its function's lines."""
    from candlecast import api

    event = path_event("health.json", "/no-such-route")
    event["requestContext"]["requestId"] = "apigw-request-7400"
    invoke("health", event)
    assert api.logger.get_correlation_id() == "apigw-request-7400"
    stream = io.StringIO()
    handler = api.logger.registered_handler
    previous, handler.stream = handler.stream, stream  # the stdout it was made with may be another test's, closed
    try:
        api.logger.warning("a line of this request")
    finally:
        handler.stream = previous
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["correlation_id"] == "apigw-request-7400"


# ---------------------------------------------------------------- a database failure's cause in the logs
@pytest.mark.parametrize(("text", "reason"), [
    ('connection to server at "10.0.3.7", port 5432 failed: FATAL:  password authentication failed for user "app"',
     "authentication"),
    ('connection to server at "10.0.3.7", port 5432 failed: FATAL:  role "app" does not exist', "authentication"),
    ('connection to server at "10.0.3.7", port 5432 failed: FATAL:  database "candle" does not exist', "config"),
    ('connection to server at "10.0.3.7", port 5432 failed: Connection refused\n\tIs the server running on that '
     'host and accepting TCP/IP connections?', "network"),
    ('could not translate host name "db.internal" to address: Name or service not known', "network"),
    ('connection to server at "10.0.3.7", port 5432 failed: timeout expired', "timeout"),
    ('connection to server at "10.0.3.7", port 5432 failed: FATAL:  the database system is starting up', "server"),
])
def test_a_connection_failure_is_classified_and_its_text_is_left_out(text, reason):
    import psycopg

    from candlecast import db

    cause = db.failure_cause(psycopg.OperationalError(text))
    assert cause == {"error": "OperationalError", "sqlstate": None, "reason": reason}


def test_a_pool_timeout_and_a_failed_attempt_waited_for_name_their_cause():
    import psycopg
    from psycopg_pool import PoolTimeout

    from candlecast import db

    assert db.failure_cause(PoolTimeout("couldn't get a connection after 1.00 sec"))["reason"] == "timeout"
    waited = db.ConnectionFailed("the connection attempt failed")
    waited.__cause__ = psycopg.OperationalError('FATAL:  role "app" does not exist')
    assert db.failure_cause(waited)["reason"] == "authentication"


@pytest.fixture
def new_container(clean_db, monkeypatch):
    from tests.conftest import reset_clients

    reset_clients()
    yield monkeypatch
    monkeypatch.undo()
    reset_clients()


def test_a_role_that_does_not_exist_is_logged_as_authentication_not_as_an_unreachable_host(new_container, caplog):
    """db logged the class only (OperationalError): a nonexistent role looked exactly like a stopped server."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from candlecast import db
    from candlecast.errors import DatabaseUnavailable
    from tests.conftest import reset_clients

    url = make_conninfo(**{**conninfo_to_dict(new_container_url()), "user": "no_such_role_7400"})
    new_container.setenv("DATABASE_URL", url)
    reset_clients()
    with caplog.at_level(logging.WARNING), pytest.raises(DatabaseUnavailable), db.connection() as conn:
        conn.execute("SELECT 1")
    (down,) = [record for record in caplog.records if record.getMessage().startswith("database down")]
    assert (down.reason, down.error) == ("authentication", "OperationalError")
    assert "no_such_role_7400" not in " ".join(str(vars(record)) for record in caplog.records)


def new_container_url() -> str:
    import os

    return os.environ["DATABASE_URL"]


def test_health_warns_once_when_it_answers_503_for_a_secret_without_host(new_container, stack, caplog):
    """A secret lacking `host` made Health answer 503 and log nothing: the reason was in the body only."""
    from tests.conftest import moto_secret, reset_clients

    arn = moto_secret(stack, json.dumps({"username": "app", "password": "pw-7400-secret"}), "candlecast/nohost")
    new_container.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", stack.s3_endpoint_url)
    new_container.delenv("DATABASE_URL", raising=False)
    new_container.setenv("DB_SECRET_ARN", arn)
    reset_clients()
    with caplog.at_level(logging.INFO):
        answers = [invoke("health", load_event("health.json"))[0] for _ in range(3)]
    assert answers == [503, 503, 503]
    warnings = [record for record in caplog.records if record.getMessage().startswith("health answers 503")]
    assert len(warnings) == 1, [record.getMessage() for record in caplog.records]
    assert "needs host" in warnings[0].error
    assert "pw-7400-secret" not in " ".join(str(vars(record)) for record in caplog.records)


# ---------------------------------------------------------------- a scheduled run that dies
def test_a_chunk_that_dies_logs_one_structured_error_before_it_raises(caplog):
    """run_chunk re-raised without a line of its own: a Score or Refresh chunk that died left Lambda's plain-text
    traceback only, with no level, no function fields and no event."""
    from candlecast.invoke import run_chunk

    def work(event, budget):
        raise RuntimeError("the bucket went away")

    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError):
        run_chunk({"after": "abc"}, None, work, 30.0, 60.0)
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert record.getMessage() == "run failed" and record.exc_info[0] is RuntimeError
    assert (record.error, record.event) == ("RuntimeError", {"after": "abc"})


def test_a_chunks_log_line_shows_twenty_items_of_each_list_and_counts_them_all(monkeypatch, caplog):
    """The report's lists grow with the data: 1,215 failing predictions made a 62 KB "score chunk done" line, a few
    thousand one past CloudWatch's 256 KB per event, cut into text that is no longer JSON."""
    from candlecast.services import scoring
    from infra.lambda_loader import LambdaContext, load_handler
    from tests.conftest import ROOT

    failed = [f"{index:08d}-prediction: model file refused" for index in range(5000)]
    report = scoring.ScoreReport(predictions=5000, failed=failed).as_dict()
    monkeypatch.setattr(scoring, "scheduled_run", lambda event, budget: dict(report))
    monkeypatch.setenv("REFRESH_CHAIN", "false")
    with caplog.at_level(logging.INFO):
        returned = load_handler(ROOT / "functions" / "score")({}, LambdaContext())
    (line,) = [record for record in caplog.records if record.getMessage() == "score chunk done"]
    assert line.failed == [*failed[:20], "… and 4980 more"] and line.predictions == 5000
    assert returned["failed"] == failed  # the invocation's result keeps every item


def test_a_retention_run_that_dies_logs_one_structured_error_before_it_raises(monkeypatch, caplog):
    from infra.lambda_loader import LambdaContext, load_handler
    from tests.conftest import ROOT

    handler = load_handler(ROOT / "functions" / "retention")
    from candlecast.services import retention

    def fails(budget):
        raise RuntimeError("statement timeout")

    monkeypatch.setattr(retention, "run", fails)
    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError):
        handler({}, LambdaContext("retention", timeout_seconds=300))
    (record,) = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert record.getMessage() == "retention failed" and record.exc_info[0] is RuntimeError


# ---------------------------------------------------------------- one line per cause
def test_a_database_that_refuses_connections_is_logged_once_not_once_per_layer_and_request(new_container, caplog):
    """With PostgreSQL down the first request logged 'database down', 'database pool timeout' and 'request failed'
    (three lines for one cause), and every later request another 'request failed'."""
    from infra.local_stack import free_port
    from tests.conftest import reset_clients

    new_container.setenv("DATABASE_URL", f"postgresql://candlecast@127.0.0.1:{free_port()}/candlecast")
    reset_clients()
    event = path_event("prediction_get.json", "/predictions/00000000-0000-4000-8000-000000000000",
                       id="00000000-0000-4000-8000-000000000000")
    with caplog.at_level(logging.WARNING):
        statuses = [invoke("predictions_get", event)[0] for _ in range(4)]
    assert statuses == [503] * 4
    lines = [record.getMessage() for record in caplog.records
             if record.levelno >= logging.WARNING and "candlecast" in record.name]  # service_undefined.candlecast.db
    assert len(lines) == 1 and lines[0].startswith("database down"), lines


def test_an_unreachable_bucket_is_logged_once_per_request_not_twice(seeded, monkeypatch, caplog):
    """storage logged 'storage unreachable' (or 'storage request failed') and raised a StorageUnavailable not marked
    as logged, so the API's error handler logged 'request failed' for the same cause: two WARNING lines per 503 for
    one S3 outage, where a database outage logs one (found with S3 answering 500s to POST /predictions)."""
    import uuid

    from candlecast import storage
    from infra.events import create_event
    from infra.local_stack import free_port
    from tests.conftest import reset_clients

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    reset_clients()
    storage.reset_clients()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                status, _, body = invoke("predictions_create", create_event(
                    {"symbol": "X:BTCUSD", "timeframe": "1d"}, idempotency_key=uuid.uuid4().hex))
                assert (status, body["error"]["code"]) == (503, "storage_unavailable")
    finally:
        monkeypatch.undo()
        reset_clients()
        storage.reset_clients()
    lines = [record.getMessage() for record in caplog.records
             if record.levelno >= logging.WARNING and "candlecast" in record.name]
    assert len(lines) == 3 and all(line.startswith("storage ") for line in lines), lines


def test_the_end_of_an_s3_outage_is_logged_with_its_length_and_failed_requests(seeded, monkeypatch, caplog):
    """An S3 outage logged a line per failed request and nothing when S3 answered again: an operator could not tell
    from the logs that it was over (a database outage logs "database up again" with its length)."""
    import uuid

    from candlecast import storage
    from infra.events import create_event
    from infra.local_stack import free_port
    from tests.conftest import reset_clients

    def create() -> int:
        return invoke("predictions_create", create_event({"symbol": "X:BTCUSD", "timeframe": "1d"},
                                                         idempotency_key=uuid.uuid4().hex))[0]

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    reset_clients()
    storage.reset_clients()
    try:
        with caplog.at_level(logging.INFO):
            assert [create(), create()] == [503, 503]
            monkeypatch.undo()
            reset_clients()
            storage.reset_clients()
            assert create() == 201
            assert create() == 201
    finally:
        monkeypatch.undo()
        reset_clients()
        storage.reset_clients()
    (recovered,) = [record for record in caplog.records if record.getMessage() == "storage up again"]
    assert recovered.failed_requests == 2 and recovered.down_seconds > 0
