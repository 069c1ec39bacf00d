"""Migrate: the Custom::DbMigration resource at deploy time, or a direct invoke.

CloudFormation events: Create and Update apply the pending migrations this function bundles, except an Update
whose previous MigrationsHash is theirs and whose new one is not: a stack rollback (the failed update's code
still deployed, the previous template's properties), which applies nothing and answers SUCCESS: migrations are
forward-only. A MigrationsHash that is neither (the built migrations/ differ from the template's: a stray or
changed file) still applies the bundled ones, which the deployed code needs, and the Reason says so. Delete is
a no-op (the schema outlives the stack). CloudFormation always gets an answer on the pre-signed URL, SUCCESS
or FAILED with the reason. A run still going at the deadline (RESPONSE_MARGIN_SECONDS before the function's
timeout) is cancelled, and the answer waits (CANCEL_GRACE_SECONDS at most) until it has rolled back, so FAILED
never goes out for a migration that then commits.

Direct invoke: {"action": "apply"} -> {"applied": [ids]}; {"action": "status"} -> {"applied": [...],
"pending": [...], "unknown": [applied in the database, not bundled here]}. Failures raise, so `aws lambda invoke`
reports a FunctionError.

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
PUT_ATTEMPTS = 3
PUT_TIMEOUT_SECONDS = 10
CANCEL_GRACE_SECONDS = 3.0  # after cancelling at the deadline, how long to wait for the run to roll back
# Answer CloudFormation this long before the function would time out: room to cancel the run and for every
# attempt at delivering the answer (with the pauses between them), so Lambda never kills a late answer.
RESPONSE_MARGIN_SECONDS = CANCEL_GRACE_SECONDS + PUT_ATTEMPTS * PUT_TIMEOUT_SECONDS + sum(range(1, PUT_ATTEMPTS)) + 2
DEFAULT_BUDGET_SECONDS = 280.0  # when there is no Lambda context (local calls)
MAX_REASON_BYTES = 1000  # UTF-8: the whole response must stay under CloudFormation's 4 KB


def _conninfo() -> str:
    from candlecast.config import database_conninfo, get_database_settings

    return database_conninfo(get_database_settings())


def apply_migrations(deadline: Any = None) -> dict[str, Any]:
    """Apply under the migration lock (a run in progress elsewhere is waited for, until the deadline), to this
    stage's database only (another stage's is refused)."""
    from candlecast import migrate
    from candlecast.config import get_database_settings

    return {"applied": migrate.apply(_conninfo(), deadline=deadline, stage=get_database_settings().stage)}


def migration_status() -> dict[str, Any]:
    from candlecast import migrate

    return migrate.status(_conninfo()).as_dict()


ACTIONS: dict[str, Callable[[], dict[str, Any]]] = {"apply": apply_migrations, "status": migration_status}
CANCEL_TICK_SECONDS = 0.25  # cancel again this often: a statement may have started since


def _run_with_deadline(work: Callable[[Any], dict[str, Any]], budget_seconds: float) -> dict[str, Any]:
    """Run `work(deadline)` in a daemon thread. If it is still going when the budget is spent, cancel it and
    wait for it to stop (its transaction rolls back), then raise TimeoutError; a run that committed just as
    it was cancelled returns its result, so the answer always says what the database holds."""
    from candlecast import migrate

    deadline = migrate.Deadline(budget_seconds)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work(deadline)
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=target, name="migrations", daemon=True)
    worker.start()
    worker.join(max(budget_seconds, 0.0))
    if worker.is_alive():
        logger.warning("migrations still running at the deadline: cancelling them",
                       extra={"budget_s": round(budget_seconds, 1)})
        give_up = time.monotonic() + CANCEL_GRACE_SECONDS
        while worker.is_alive() and time.monotonic() < give_up:
            deadline.cancel()
            worker.join(CANCEL_TICK_SECONDS)
        if worker.is_alive():
            raise TimeoutError(
                f"migrations still running after {budget_seconds:.1f} s and not stopped "
                f"{CANCEL_GRACE_SECONDS:g} s after cancelling them; the database ends them (statement_timeout) "
                "and rolls back what they had not committed"
            )
        if "error" in outcome:
            raise TimeoutError(f"migrations still running after {budget_seconds:.1f} s: cancelled, and rolled "
                               f"back ({outcome['error']})") from outcome["error"]
        logger.warning("the migrations committed as they were cancelled", extra=outcome["result"])
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
        "Reason": _fitted(reason),
        "PhysicalResourceId": physical_id,
        "StackId": event["StackId"],
        "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
        "NoEcho": False,
        "Data": data,
    }, ensure_ascii=False).encode()
    # An empty Content-Type: the pre-signed URL was signed without one.
    request = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": ""})  # noqa: S310
    for attempt in range(1, PUT_ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=PUT_TIMEOUT_SECONDS) as response:  # noqa: S310 (scheme checked above)
                logger.info("answered CloudFormation", extra={"status": status, "http_status": response.status})
                return
        except (urllib.error.URLError, OSError) as error:
            logger.warning("could not answer CloudFormation", extra={"attempt": attempt, "error": str(error)})
            if attempt < PUT_ATTEMPTS:
                time.sleep(attempt)
    # Custom resources are invoked asynchronously: raising lets Lambda retry the whole event.
    raise ConnectionError("could not deliver the response to CloudFormation")


def _fitted(reason: str) -> str:
    """`reason` cut to MAX_REASON_BYTES of UTF-8, at a character's boundary."""
    return reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


def _hash_check(event: dict) -> tuple[bool, str]:
    """(whether to apply the bundled migrations, what the Reason adds). An Update that names this function's
    migrations only as its previous MigrationsHash is a stack rollback: nothing applied. Any other hash that is
    not theirs is a build whose migrations/ differ from the template's: they are applied, as the deployed code
    needs them, and named. Raises MigrationError (FAILED) when the bundled folder is missing or empty."""
    from candlecast import migrate

    bundled = migrate.bundled_hash()
    requested = (event.get("ResourceProperties") or {}).get("MigrationsHash")
    if requested in (None, bundled):
        return True, ""
    previous = (event.get("OldResourceProperties") or {}).get("MigrationsHash")
    hashes = {"requested_hash": requested, "previous_hash": previous, "bundled_hash": bundled}
    if event.get("RequestType") == "Update" and previous == bundled:
        logger.warning("applying no migrations: a stack rollback to a template with other migrations", extra=hashes)
        return False, (f"applied nothing: MigrationsHash {requested[:12]}… is not this function's migrations "
                       f"({bundled[:12]}…) but the previous one was, a stack rollback; migrations are "
                       "forward-only, so the schema stays as it is")
    logger.warning("the template's MigrationsHash is not this function's migrations: applying the function's",
                   extra=hashes)
    return True, (f"; MigrationsHash {requested[:12]}… is not the migrations built into this function "
                  f"({bundled[:12]}…): a stray or changed file in migrations/, or a template without "
                  "`make migrations-hash`")


def handle_custom_resource(event: dict, context: Any) -> dict[str, str]:
    request_type = event.get("RequestType")
    physical_id = event.get("PhysicalResourceId") or f"{event.get('LogicalResourceId', 'DbMigration')}-schema"
    data: dict[str, str] = {}
    try:
        if request_type == "Delete":
            status, reason = SUCCESS, "Delete is a no-op: the schema and its data outlive the stack"
        elif request_type in ("Create", "Update"):
            apply, why = _hash_check(event)
            if not apply:
                data = {"AppliedCount": "0", "Applied": ""}
                status, reason = SUCCESS, why
            else:
                applied = _run_with_deadline(apply_migrations, _budget_seconds(context))["applied"]
                data = {"AppliedCount": str(len(applied)), "Applied": ",".join(applied)[:500]}
                status, reason = SUCCESS, f"applied {len(applied)} migration(s){why}"
        else:
            raise ValueError(f"unknown RequestType {request_type!r}")
    except Exception as error:
        logger.exception("migration request failed", extra={"request_type": request_type})
        status, reason = FAILED, f"{type(error).__name__}: {error}"
    send_response(event, status, reason, physical_id, data)
    return {"Status": status, "Reason": _fitted(reason), "PhysicalResourceId": physical_id}


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict, context: Any) -> dict[str, Any]:
    if isinstance(event, dict) and "RequestType" in event and "ResponseURL" in event:
        return handle_custom_resource(event, context)
    action = event.get("action") if isinstance(event, dict) else None
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: invoke with {{\"action\": \"apply\" | \"status\"}}")
    result = (_run_with_deadline(apply_migrations, _budget_seconds(context)) if action == "apply"
              else ACTIONS[action]())
    logger.info("migrations", extra={"action": action, **result})
    return result

startup.done()  # the function is loaded: freeze it and collect again
