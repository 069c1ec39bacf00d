"""What an operator sees of a request: its metrics' dimensions, its logs' correlation id, one line per cause."""

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
