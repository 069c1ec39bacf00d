"""Domain errors and their one mapping to HTTP. Every error body is {"error": {"code", "message"}}."""


class CandlecastError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class BadRequest(CandlecastError):
    status = 400
    code = "bad_request"


class NotFound(CandlecastError):
    status = 404
    code = "not_found"


class Conflict(CandlecastError):
    status = 409
    code = "conflict"


class PayloadTooLarge(CandlecastError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(CandlecastError):
    status = 415
    code = "unsupported_media_type"


class ServiceUnavailable(CandlecastError):
    status = 503
    code = "service_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class ModelUnavailable(ServiceUnavailable):
    code = "model_unavailable"


class ModelIntegrityError(CandlecastError):
    """A model file whose signature or checksum does not match: it is never unpickled."""

    status = 503
    code = "model_integrity"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
