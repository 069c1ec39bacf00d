"""A scheduled run stops starting new work early enough for the statement in flight to end within its timeout."""

import pytest

from infra.lambda_loader import LambdaContext, load_handler
from tests.conftest import ROOT, reset_clients

pytestmark = pytest.mark.integration

TIMEOUT_S = 300  # Score's and Retention's Timeout in template.yaml
STATEMENT_S = 60  # their DB_STATEMENT_TIMEOUT


@pytest.fixture
def batch_settings(app_env, monkeypatch):
    monkeypatch.setenv("DB_STATEMENT_TIMEOUT", str(STATEMENT_S))
    monkeypatch.setenv("REFRESH_CHAIN", "false")
    reset_clients()
    yield
    monkeypatch.undo()
    reset_clients()


def test_score_and_retention_stop_starting_work_a_statement_timeout_and_a_report_before_their_timeout(
        batch_settings, monkeypatch):
    """They stopped 30 s before the timeout while the template lets one statement run 60 s: a batch started at the
    last moment was killed by Lambda's timeout mid-statement, with no report and (for Score) no continuation."""
    from candlecast.services import retention, scoring

    budgets = {}
    monkeypatch.setattr(scoring, "scheduled_run",
                        lambda event, budget: budgets.setdefault("score", budget) and scoring.ScoreReport().as_dict())
    monkeypatch.setattr(retention, "run", lambda budget: budgets.setdefault("retention", budget) and {"enabled": False})
    for name in ("score", "retention"):
        load_handler(ROOT / "functions" / name)({}, LambdaContext(name, timeout_seconds=TIMEOUT_S))
    for name, budget in budgets.items():
        left = TIMEOUT_S - budget  # for the statement in flight, then the report
        assert left >= STATEMENT_S + 30, (name, budget)
        assert left <= STATEMENT_S + 30 + 1, (name, budget)  # not much more: the run keeps most of its time
