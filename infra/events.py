"""The sample events in tests/events (the files `sam local invoke -e` takes), for tests, benchmarks and checks."""

import copy
import json
from pathlib import Path

EVENTS = Path(__file__).resolve().parent.parent / "tests" / "events"


def load_event(name: str, **changes) -> dict:
    """An event from tests/events (API Gateway HTTP API v2, scheduled, CloudFormation), top-level keys changed."""
    event = copy.deepcopy(json.loads((EVENTS / name).read_text()))
    event.update(changes)
    return event


def path_event(name: str, path: str, **path_parameters: str) -> dict:
    """A v2 event from tests/events for another path: rawPath decoded, as API Gateway sends it."""
    event = load_event(name)
    event["rawPath"] = path
    event["requestContext"]["http"]["path"] = event["rawPath"]
    if path_parameters:
        event["pathParameters"] = path_parameters
    return event


def create_event(body: dict | str, idempotency_key: str | None = None, **changes) -> dict:
    """POST /predictions with `body` (a dict goes as JSON) and no Idempotency-Key unless one is given (the
    sample event carries one)."""
    event = load_event("predictions_create.json", body=body if isinstance(body, str) else json.dumps(body), **changes)
    event["headers"].pop("idempotency-key", None)
    if idempotency_key is not None:
        event["headers"]["idempotency-key"] = idempotency_key
    return event
