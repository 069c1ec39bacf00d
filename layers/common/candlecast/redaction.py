"""A logging filter that removes the configured secrets from every log record.

The secrets: the database and Redis passwords (from DATABASE_URL, REDIS_URL or the Secrets Manager secret), the
model signing keys (the current one and, during a rotation, the previous one), the Polygon API key and the function's
AWS credentials (botocore's debug log prints the session token), plus any value read from Secrets Manager. Message,
arguments, extra fields, exception text and stack are all checked; a match becomes `[redacted]`.
"""

import logging
import os
import re
import threading
import traceback
from typing import Any
from urllib.parse import quote, unquote, urlsplit

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 4  # shorter values would redact ordinary words
SECRET_VARIABLES = ("MODEL_SIGNING_KEY", "MODEL_SIGNING_KEY_PREVIOUS", "POLYGON_API_KEY", "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN")
URL_VARIABLES = ("DATABASE_URL", "REDIS_URL")  # their passwords
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_registered: set[str] = set()
_lock = threading.Lock()
_compiled: tuple[frozenset[str], re.Pattern | None] = (frozenset(), None)


class RedactedError(Exception):
    """Stands in for an exception whose text held a secret."""


def register(*values: str | None) -> None:
    """Add secrets read at run time (e.g. from Secrets Manager)."""
    with _lock:
        _registered.update(value for value in values if value)


def _url_password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    if password is None:
        match = re.search(r"(?:^|\s)password\s*=\s*(\S+)", url)  # key=value conninfo
        password = match.group(1).strip("'") if match else None
    return password


def secrets() -> frozenset[str]:
    found = set()
    for name in os.environ:  # in any letter case, as the settings read them
        if name.upper() in SECRET_VARIABLES:
            found.add(os.environ[name])
        elif name.upper() in URL_VARIABLES:
            found.add(_url_password(os.environ[name]))
    with _lock:
        found |= _registered
    variants = set()
    for value in found:
        if value and len(value.strip()) >= MIN_SECRET_LENGTH:
            variants |= {value.strip(), quote(value.strip(), safe=""), unquote(value.strip())}
    return frozenset(variant for variant in variants if len(variant) >= MIN_SECRET_LENGTH)


def _pattern() -> re.Pattern | None:
    global _compiled
    current = secrets()
    if current != _compiled[0]:
        ordered = sorted(current, key=len, reverse=True)  # longest first: a secret inside another
        _compiled = (current, re.compile("|".join(map(re.escape, ordered))) if ordered else None)
    return _compiled[1]


def redact(text: str) -> str:
    pattern = _pattern()
    return pattern.sub(REDACTED, text) if pattern is not None else text


def redacted(value: Any) -> Any:
    """`value` (a function's report: dicts, lists, strings, numbers) with every secret in it replaced."""
    pattern = _pattern()
    return value if pattern is None else _redact_value(value, pattern)


def leaving(error: BaseException) -> BaseException:
    """The exception to let out of a function for `error`: Lambda's runtime logs and returns an uncaught
    exception's text (and the chain's) itself, outside the logging filter. `error` itself when none of that text
    holds a secret, else a RedactedError with its type's name and its redacted message."""
    pattern = _pattern()
    if pattern is None or not pattern.search("".join(traceback.format_exception(error))):
        return error
    return RedactedError(f"{type(error).__name__}: {pattern.sub(REDACTED, str(error))}")


def _redact_value(value: Any, pattern: re.Pattern) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, dict):
        return {_redact_value(key, pattern): _redact_value(item, pattern) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_redact_value(item, pattern) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    cleaned = pattern.sub(REDACTED, text)
    return cleaned if cleaned != text else value


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception:  # a log line must never fail because of its filter; drop the risky parts
            record.msg, record.args, record.exc_info, record.exc_text = "log record withheld", (), None, None
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        pattern = _pattern()
        if pattern is None:
            return
        message = record.getMessage() if not isinstance(record.msg, dict) else record.msg
        record.msg, record.args = _redact_value(message, pattern), ()
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRIBUTES:
                setattr(record, name, _redact_value(value, pattern))
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            if pattern.search(text):
                error = RedactedError(pattern.sub(REDACTED, text))
                record.exc_info, record.exc_text = (RedactedError, error, None), None
        if record.exc_text:
            record.exc_text = pattern.sub(REDACTED, record.exc_text)
        if record.stack_info:
            record.stack_info = pattern.sub(REDACTED, record.stack_info)


_filter = RedactSecrets()


def install(*loggers: Any) -> None:
    """Filter the handlers of `loggers` (Powertools or standard) and of the root logger, where every
    library's records end up."""
    handlers = list(logging.getLogger().handlers)
    for logger in loggers:
        handler = getattr(logger, "registered_handler", None)
        handlers += [handler] if handler is not None else list(getattr(logger, "handlers", []))
    for handler in handlers:
        if _filter not in handler.filters:
            handler.addFilter(_filter)
