"""Weekly refresh (EventBridge schedule): symbols by volume, then candles for the top N, in chunks.

Each invocation works until its remaining time minus a margin, then stops starting new symbols
(those in flight finish their atomic writes). What is left is returned as `continuation` and, when
REFRESH_CHAIN is not "false", handed to a new asynchronous invocation of this function, so 500
symbols always finish within Lambda's 15-minute limit per invocation.

A chunk that added candles starts the Score function (SCORE_FUNCTION_NAME, set by the template), which scores
the prediction steps those candles matured; where no Score function is named (a local run), it scores in this
process instead.
"""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from aws_lambda_powertools import Logger

from candlecast import ingest, redaction
from candlecast.config import get_settings
from candlecast.invoke import invoke_async, loggable, run_chunk
from candlecast.metrics import add_counts, function_metrics, metric_dimensions

logger = Logger()
redaction.install(logger)
metrics = function_metrics()

# One symbol in flight, plus the report: invoke.stop_margin_seconds adds the statement in flight
# (DB_STATEMENT_TIMEOUT, 60 s here) to this, 90.35 s in all, the 90 s margin it always had.
REPORT_SECONDS = 30.0
LOCAL_BUDGET_SECONDS = 600.0


def _score() -> str:
    """Start scoring what the new candles matured: 'invoked' (the Score function) or 'inline' (a local run), or
    'not started'. A failure to start it is logged and returned, never raised: the rest of the run is handed on
    already, and a raised error would make Lambda run this chunk, and hand it on, again. The hourly schedule
    scores what this start would have."""
    function_name = get_settings().score_function_name
    if function_name:
        try:
            invoke_async(function_name, {})
        except Exception as error:
            logger.warning("scoring not started", extra={"error": type(error).__name__})
            return "not started"
        return "invoked"
    from candlecast.services import scoring

    scoring.run(LOCAL_BUDGET_SECONDS)
    return "inline"


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event, context):
    metrics.set_default_dimensions(**metric_dimensions("refresh"))
    report = run_chunk(event, context, ingest.scheduled_refresh, REPORT_SECONDS, LOCAL_BUDGET_SECONDS)
    # A chunk whose symbols all failed still returns: RefreshFailedShareAlarm reads these, not the failed runs. A
    # symbol whose metadata was not recorded failed too (it may be in both lists), as did one this run leaves
    # undone: not handed on (a chain stopped by a long 429 hold, or past MAX_CHUNKS).
    left_undone = set() if report["chained"] else set(report["remaining"])
    failed = set(report["failed"]) | set(report["unrecorded"]) | left_undone
    add_counts(metrics, RefreshSymbolsDone=report["symbols_done"], RefreshSymbolsFailed=len(failed))
    report["scoring"] = _score() if report.get("candles_added") else "off"
    logger.info("refresh chunk done", extra=loggable(report))
    return report

startup.done()  # the function is loaded: freeze it and collect again
