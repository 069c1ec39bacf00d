"""Weekly refresh (EventBridge schedule): symbols by volume, then candles for the top N, in chunks.

Each invocation works until its remaining time minus a margin, then stops starting new symbols
(those in flight finish their atomic writes). What is left is returned as `continuation` and, when
REFRESH_CHAIN is not "false", handed to a new asynchronous invocation of this function, so 500
symbols always finish within Lambda's 15-minute limit per invocation.
"""

import json

from aws_lambda_powertools import Logger

from candlecast import ingest
from candlecast.config import get_settings

logger = Logger()

MARGIN_SECONDS = 90.0  # one symbol in flight, plus the report
LOCAL_BUDGET_SECONDS = 600.0


def _continue(context, event: dict) -> bool:
    if context is None or not get_settings().refresh_chain:
        return False
    import boto3

    boto3.client("lambda").invoke(
        FunctionName=context.invoked_function_arn, InvocationType="Event", Payload=json.dumps(event).encode()
    )
    return True


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event, context):
    event = event if isinstance(event, dict) and "detail-type" not in event else {}  # schedule: defaults
    remaining_ms = context.get_remaining_time_in_millis() if context is not None else LOCAL_BUDGET_SECONDS * 1000
    report = ingest.scheduled_refresh(event, remaining_ms / 1000 - MARGIN_SECONDS)
    continuation = report.get("continuation")
    report["chained"] = bool(continuation) and _continue(context, continuation)
    logger.info("refresh chunk done", extra={key: value for key, value in report.items() if key != "continuation"})
    return report
