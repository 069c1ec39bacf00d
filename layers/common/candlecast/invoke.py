"""Asynchronous Lambda invocations: a function handing the rest of a long run to itself, or starting another."""

import json
from collections.abc import Callable

from aws_lambda_powertools import Logger

from candlecast import redaction
from candlecast.config import get_settings
from candlecast.errors import InvalidEvent

logger = Logger(child=True)

# Items of each list a chunk's log line shows. The report's lists grow with the data (every failed prediction or
# symbol): 1,215 failing predictions made a 62 KB line, a few thousand one past CloudWatch's 256 KB per event,
# which it cuts into text that is no longer JSON.
LOGGED_ITEMS = 20


def invoke_async(function_name: str, event: dict) -> None:
    import boto3

    boto3.client("lambda").invoke(FunctionName=function_name, InvocationType="Event",
                                  Payload=json.dumps(event).encode())


def continue_in_new_invocation(context, event: dict) -> bool:
    """Hand `event` to a new invocation of the running function (only in Lambda, and unless REFRESH_CHAIN=false)."""
    if context is None or not get_settings().refresh_chain:
        return False
    invoke_async(context.invoked_function_arn, event)
    return True


def stop_margin_seconds(report_seconds: float) -> float:
    """How long before its timeout a scheduled run stops starting new work: the statement in flight may still run
    as long as it is allowed (DB_STATEMENT_TIMEOUT, 60 s for the batch functions, as the watchdog enforces it:
    db.longest_wait), and then `report_seconds` are left to record, report and hand on the rest."""
    from candlecast import db

    return db.longest_wait(get_settings()) + report_seconds


def budget_seconds(context, report_seconds: float, local_budget_seconds: float) -> float:
    """The time a scheduled run may start new work in: the invocation's remaining time (`local_budget_seconds`
    without a Lambda context) less stop_margin_seconds(report_seconds)."""
    remaining_ms = context.get_remaining_time_in_millis() if context is not None else local_budget_seconds * 1000
    return remaining_ms / 1000 - stop_margin_seconds(report_seconds)


SCHEDULED = ("aws.events", "Scheduled Event")  # an EventBridge schedule's event: source and detail-type


def run_chunk(event, context, work: Callable[[object, float], dict], report_seconds: float,
              local_budget_seconds: float) -> dict:
    """One chunk of a long scheduled run: `work(event, budget_seconds)` validates the event (an InvocationEvent's
    `parse`) and returns a report whose `continuation` (if any) is handed to a new invocation. A schedule's own event
    (an EventBridge rule's, without Input) means a run with the defaults; any other event, a dict or not, is the
    work's to validate (a bare string or list is refused, never run as {})."""
    if isinstance(event, dict) and (event.get("source"), event.get("detail-type")) == SCHEDULED:
        event = {}
    try:
        report = work(event, budget_seconds(context, report_seconds, local_budget_seconds))
    except Exception as error:
        # One structured ERROR line with the traceback (redacted by the log filter) and the invocation's context;
        # what Lambda's runtime writes for the uncaught error is its own, and outside Powertools' fields.
        if isinstance(error, InvalidEvent):  # its message names what is wrong: a traceback would add nothing
            logger.error("run refused", extra={"error": error.message, "event": redaction.redacted(event)})
        else:
            logger.exception("run failed", extra={"error": type(error).__name__, "event": redaction.redacted(event)})
        leaving = redaction.leaving(error)
        if leaving is error:
            raise
        raise leaving from None
    report = redaction.redacted(report)  # it is returned, and logged by Lambda's caller, without the log filter
    continuation = report.get("continuation")
    report["chained"] = bool(continuation) and continue_in_new_invocation(context, continuation)
    return report


def loggable(report: dict) -> dict:
    """A chunk's report as its log line shows it: without its continuation, each list cut at LOGGED_ITEMS with the
    number left out (the counts and the returned report keep every item)."""
    shown = {}
    for key, value in report.items():
        if key == "continuation":
            continue
        if isinstance(value, list) and len(value) > LOGGED_ITEMS:
            value = [*value[:LOGGED_ITEMS], f"… and {len(value) - LOGGED_ITEMS} more"]
        shown[key] = value
    return shown
