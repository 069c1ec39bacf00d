"""Migrate: the Custom::DbMigration resource at deploy time, or a direct invoke.

CloudFormation events: Create and Update apply pending migrations under yoyo's lock; Delete is a
no-op (the schema outlives the stack). CloudFormation always gets an answer on the pre-signed URL,
SUCCESS or FAILED with the reason, also when applying fails or would outlast the function, so a stack
never waits for a response that will not come.

Direct invoke: {"action": "apply"} -> {"applied": [ids]}; {"action": "status"} -> {"applied": [...],
"pending": [...]}. Failures raise, so `aws lambda invoke` reports a FunctionError.

migrations/ ships inside this function (functions/migrate/migrations links to it; MIGRATIONS_DIR).
"""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger

from candlecast import redaction

logger = Logger()
redaction.install(logger)

SUCCESS, FAILED = "SUCCESS", "FAILED"
RESPONSE_MARGIN_SECONDS = 10.0  # answer CloudFormation this long before the function would time out
DEFAULT_BUDGET_SECONDS = 280.0  # when there is no Lambda context (local calls)
PUT_ATTEMPTS = 3
MAX_REASON_CHARS = 1000  # the whole response must stay under CloudFormation's 4 KB


def _conninfo() -> str:
    from candlecast.config import database_conninfo, get_database_settings

    return database_conninfo(get_database_settings())


def apply_migrations(stale_lock_seconds: float = DEFAULT_BUDGET_SECONDS + RESPONSE_MARGIN_SECONDS) -> dict[str, Any]:
    """Apply under yoyo's lock; a lock older than this function's timeout was left by a killed run: break it."""
    from candlecast import migrate

    def log_broken(lock: dict) -> None:
        logger.warning("broke a stale migration lock", extra={"lock": lock, "older_than_s": stale_lock_seconds})

    return {"applied": migrate.apply(_conninfo(), break_locks_older_than=stale_lock_seconds,
                                     on_broken_lock=log_broken)}


def migration_status() -> dict[str, Any]:
    from candlecast import migrate

    return migrate.status(_conninfo()).as_dict()


ACTIONS: dict[str, Callable[[], dict[str, Any]]] = {"apply": apply_migrations, "status": migration_status}


def _run_with_deadline(work: Callable[[], dict[str, Any]], budget_seconds: float) -> dict[str, Any]:
    """Run `work` in a daemon thread; raise TimeoutError if it has not finished within the budget."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=target, name="migrations", daemon=True)
    worker.start()
    worker.join(max(budget_seconds, 0.0))
    if worker.is_alive():
        raise TimeoutError(f"migrations still running after {budget_seconds:.1f} s; answering before the timeout")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _budget_seconds(context: Any) -> float:
    return _timeout_seconds(context) - RESPONSE_MARGIN_SECONDS


def _timeout_seconds(context: Any) -> float:
    """The function's timeout, as its remaining time at the start of the invocation."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return remaining() / 1000 if remaining is not None else DEFAULT_BUDGET_SECONDS + RESPONSE_MARGIN_SECONDS


def send_response(event: dict, status: str, reason: str, physical_id: str, data: dict[str, str]) -> None:
    """PUT the result to CloudFormation's pre-signed S3 URL, retrying; raise if every attempt failed."""
    url = event["ResponseURL"]
    if not url.startswith(("https://", "http://")):
        raise ValueError("ResponseURL is not an http(s) URL")
    body = json.dumps({
        "Status": status,
        "Reason": reason[:MAX_REASON_CHARS],
        "PhysicalResourceId": physical_id,
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "NoEcho": False,
        "Data": data,
    }).encode()
    # An empty Content-Type: the pre-signed URL was signed without one.
    request = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": ""})  # noqa: S310
    for attempt in range(1, PUT_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (scheme checked above)
                logger.info("answered CloudFormation", extra={"status": status, "http_status": response.status})
                return
        except (urllib.error.URLError, OSError) as error:
            logger.warning("could not answer CloudFormation", extra={"attempt": attempt, "error": str(error)})
            if attempt < PUT_ATTEMPTS:
                time.sleep(attempt)
    # Custom resources are invoked asynchronously: raising lets Lambda retry the whole event.
    raise ConnectionError("could not deliver the response to CloudFormation")


def handle_custom_resource(event: dict, context: Any) -> dict[str, str]:
    request_type = event.get("RequestType")
    physical_id = event.get("PhysicalResourceId") or f"{event.get('LogicalResourceId', 'DbMigration')}-schema"
    data: dict[str, str] = {}
    try:
        if request_type == "Delete":
            status, reason = SUCCESS, "Delete is a no-op: the schema and its data outlive the stack"
        elif request_type in ("Create", "Update"):
            timeout = _timeout_seconds(context)
            applied = _run_with_deadline(lambda: apply_migrations(timeout), _budget_seconds(context))["applied"]
            data = {"AppliedCount": str(len(applied)), "Applied": ",".join(applied)[:500]}
            status, reason = SUCCESS, f"applied {len(applied)} migration(s)"
        else:
            raise ValueError(f"unknown RequestType {request_type!r}")
    except Exception as error:
        logger.exception("migration request failed", extra={"request_type": request_type})
        status, reason = FAILED, f"{type(error).__name__}: {error}"
    send_response(event, status, reason, physical_id, data)
    return {"Status": status, "Reason": reason[:MAX_REASON_CHARS], "PhysicalResourceId": physical_id}


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict, context: Any) -> dict[str, Any]:
    if isinstance(event, dict) and "RequestType" in event and "ResponseURL" in event:
        return handle_custom_resource(event, context)
    action = event.get("action") if isinstance(event, dict) else None
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: invoke with {{\"action\": \"apply\" | \"status\"}}")
    result = apply_migrations(_timeout_seconds(context)) if action == "apply" else ACTIONS[action]()
    logger.info("migrations", extra={"action": action, **result})
    return result

startup.done()  # the function is loaded: freeze it and collect again
