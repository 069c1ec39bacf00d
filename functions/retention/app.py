"""Daily retention (EventBridge schedule): delete expired predictions in batches, within the time limit."""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from aws_lambda_powertools import Logger

from candlecast import redaction
from candlecast.invoke import budget_seconds
from candlecast.metrics import add_counts, function_metrics, metric_dimensions
from candlecast.services import retention

logger = Logger()
redaction.install(logger)
metrics = function_metrics()

REPORT_SECONDS = 30.0  # after the batch in flight and its statement (invoke.stop_margin_seconds): the report
LOCAL_BUDGET_SECONDS = 600.0


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event, context):
    metrics.set_default_dimensions(**metric_dimensions("retention"))
    try:
        report = retention.run(budget_seconds(context, REPORT_SECONDS, LOCAL_BUDGET_SECONDS))
    except Exception as error:  # one structured ERROR line (redacted), then Lambda's retry and failed-runs queue
        logger.exception("retention failed", extra={"error": type(error).__name__})
        leaving = redaction.leaving(error)
        if leaving is error:
            raise
        raise leaving from None
    if report["enabled"]:  # PREDICTION_RETENTION_DAYS=none: nothing was looked at, nothing to count
        add_counts(metrics, RetentionPredictionsDeleted=report["deleted"],
                   RetentionOutcomesForgotten=report.get("outcomes_forgotten", 0),  # only once none is left
                   RetentionCacheNotDropped=report["cache_not_dropped"])
    logger.info("retention done", extra=report)
    return report

startup.done()  # the function is loaded: freeze it and collect again
