"""Domain errors and their one mapping to HTTP. Every error body is {"error": {"code", "message"}}."""


class CandlecastError(Exception):
    status = 500
    code = "internal_error"
    # True when whoever raised it has logged its cause already (the database's outage, a statement timeout): the
    # API's error handler then logs no second line for the same cause.
    logged = False

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class UnusableInput(ValueError):
    """Input a command cannot use (a model file, a manifest, an argument that disagrees with the file): the CLI
    prints its message, not a traceback. A ValueError, as the checks that raise it always were."""


class BadRequest(CandlecastError):
    status = 400
    code = "bad_request"


class InvalidFields(CandlecastError):
    """A well-formed body whose fields (or shape) are not what the route takes; the code the validation of a
    body's fields answers with."""

    status = 422
    code = "validation_error"


class InvalidEvent(CandlecastError):
    """An invocation event a scheduled function refuses (a field of the wrong type or out of bounds, an unknown
    field): nothing is run, and the message names each field and what is wrong with it."""

    status = 400
    code = "invalid_event"


class NotFound(CandlecastError):
    status = 404
    code = "not_found"


class Conflict(CandlecastError):
    status = 409
    code = "conflict"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("Idempotency-Key was already used for another symbol or timeframe")


class ModelVersionTaken(Conflict):
    """A model registered again under its name and version with another file: predictions name the row, so its
    file never changes; a changed model is a new version."""

    code = "model_version_taken"


class PayloadTooLarge(CandlecastError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(CandlecastError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(CandlecastError):
    """A dependency failed; the answer carries Retry-After (seconds)."""

    status = 503
    code = "service_unavailable"
    retry_after = 2

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message, code=code)
        if retry_after is not None:
            self.retry_after = max(1, int(retry_after))


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    retry_after = 1


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class CandleFileInvalid(ServiceUnavailable):
    """A stored candle file that is not a candle series (not Parquet, other columns, open times that are no date,
    off the timeframe's grid or in the future). No retry mends it, unlike an S3 outage (storage_unavailable): an
    operator must delete or rewrite the file, so the client is told to come back much later."""

    code = "candle_file_invalid"
    retry_after = 300
    key = ""  # the file's S3 key, and why it is refused: for logs, never in the message
    problem = ""
    etag = ""  # the version refused: a rebuild writes over it alone


class FileChanged(CandlecastError):
    """A write made only over the version of a file that was read (`storage.put_bytes`' `over`) found another
    version there: another writer (an operator's put-candles, another run) wrote it since. Nothing was written."""

    status = 409
    code = "file_changed"


class SecretsUnavailable(ServiceUnavailable):
    """A secret could not be read from Secrets Manager (code secrets_unavailable), or its value is not what
    the service needs (code secret_invalid)."""

    code = "secrets_unavailable"


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"
    retry_after = 30


class ModelIntegrityError(CandlecastError):
    """A model file whose signature or checksum does not match: it is never unpickled."""

    status = 503
    code = "model_integrity"
    retry_after = 60


class ModelSignatureMismatch(ModelIntegrityError):
    """A signature that verifies under none of the keys: a tampered file, or one signed with a key this container
    has not read yet (a rotation)."""


def retry_after(error: CandlecastError) -> int | None:
    """Seconds a client should wait before retrying, for every 503."""
    if error.status != 503:
        return None
    return getattr(error, "retry_after", ServiceUnavailable.retry_after)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
