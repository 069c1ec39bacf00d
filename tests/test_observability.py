"""What an operator sees of a request: its metrics' dimensions, its logs' correlation id, one line per cause."""

import io
import json

import pytest

from infra.events import path_event
from tests.conftest import invoke

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
    assert [sorted(each) for each in directive["Dimensions"]] == [["function", "service", "stage"]]
    assert (blob["service"], blob["stage"], blob["function"]) == ("candlecast", "local", "health")


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
