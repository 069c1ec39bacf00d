"""Asynchronous Lambda invocations: a function handing the rest of a long run to itself, or starting another."""

import json
from collections.abc import Callable

from aws_lambda_powertools import Logger

from candlecast import redaction
from candlecast.config import get_settings

logger = Logger(child=True)


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


def run_chunk(event, context, work: Callable[[dict, float], dict], margin_seconds: float,
              local_budget_seconds: float) -> dict:
    """One chunk of a long scheduled run: `work(event, budget_seconds)` returns a report whose `continuation`
    (if any) is handed to a new invocation. A schedule's own event means a run with the defaults."""
    event = event if isinstance(event, dict) and "detail-type" not in event else {}
    remaining_ms = context.get_remaining_time_in_millis() if context is not None else local_budget_seconds * 1000
    try:
        report = work(event, remaining_ms / 1000 - margin_seconds)
    except Exception as error:
        # One structured ERROR line with the traceback (redacted by the log filter) and the invocation's context;
        # what Lambda's runtime writes for the uncaught error is its own, and outside Powertools' fields.
        logger.exception("run failed", extra={"error": type(error).__name__, "event": redaction.redacted(event)})
        leaving = redaction.leaving(error)
        if leaving is error:
            raise
        raise leaving from None
    report = redaction.redacted(report)  # it is returned, and logged by Lambda's caller, without the log filter
    continuation = report.get("continuation")
    report["chained"] = bool(continuation) and continue_in_new_invocation(context, continuation)
    return report
