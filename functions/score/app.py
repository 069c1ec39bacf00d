"""Score matured prediction steps (hourly EventBridge schedule, and after each refresh that added candles).

Each invocation works until its remaining time minus a margin, then returns `continuation` (the last
prediction done) and, when REFRESH_CHAIN is not "false", hands it to a new asynchronous invocation of this
function, as the refresh does. Scoring is idempotent: a step scored twice counts once.
"""

from aws_lambda_powertools import Logger

from candlecast.invoke import continue_in_new_invocation
from candlecast.services import scoring

logger = Logger()

MARGIN_SECONDS = 30.0
LOCAL_BUDGET_SECONDS = 600.0


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event, context):
    event = event if isinstance(event, dict) and "detail-type" not in event else {}  # schedule: defaults
    remaining_ms = context.get_remaining_time_in_millis() if context is not None else LOCAL_BUDGET_SECONDS * 1000
    report = scoring.scheduled_run(event, remaining_ms / 1000 - MARGIN_SECONDS)
    continuation = report.get("continuation")
    report["chained"] = bool(continuation) and continue_in_new_invocation(context, continuation)
    logger.info("score chunk done", extra={key: value for key, value in report.items() if key != "continuation"})
    return report
