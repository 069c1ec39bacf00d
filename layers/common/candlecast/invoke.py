"""Asynchronous Lambda invocations: a function handing the rest of a long run to itself, or starting another."""

import json

from candlecast.config import get_settings


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
