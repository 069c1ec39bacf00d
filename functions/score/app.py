"""Score matured prediction steps (hourly EventBridge schedule, and after each refresh that added candles).

Each invocation works until its remaining time minus a margin, then returns `continuation` (the last
prediction done) and, when REFRESH_CHAIN is not "false", hands it to a new asynchronous invocation of this
function, as the refresh does. Scoring is idempotent: a step scored twice counts once.
"""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit

from candlecast import redaction
from candlecast.invoke import loggable, run_chunk
from candlecast.metrics import add_counts, function_metrics, metric_dimensions
from candlecast.services import scoring

logger = Logger()
redaction.install(logger)
metrics = function_metrics()

REPORT_SECONDS = 30.0  # after the statement in flight (invoke.stop_margin_seconds): record, report, hand on
LOCAL_BUDGET_SECONDS = 600.0


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event, context):
    metrics.set_default_dimensions(**metric_dimensions("score"))
    report = run_chunk(event, context, scoring.scheduled_run, REPORT_SECONDS, LOCAL_BUDGET_SECONDS)
    # A chunk whose predictions fail still returns: ScoreFailedShareAlarm reads these, not the failed runs.
    add_counts(metrics, ScorePredictions=report["predictions"], ScorePredictionsFailed=len(report["failed"]),
               ScorePredictionsSkipped=report["skipped"], ScoreStepsScored=report["scored"])
    if report["stored_candles_age_hours"] is not None:  # StaleCandlesAlarm reads it
        metrics.add_metric(name="StoredCandlesAgeHours", unit=MetricUnit.NoUnit,
                           value=report["stored_candles_age_hours"])
    if report["drifting"] is not None:  # ModelDriftAlarm reads it
        add_counts(metrics, ModelsDrifting=len(report["drifting"]))
    logger.info("score chunk done", extra=loggable(report))
    return report

startup.done()  # the function is loaded: freeze it and collect again
