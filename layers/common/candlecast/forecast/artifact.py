"""Signed model files: HMAC-SHA256 over the file bytes, checked before anything is unpickled."""

import hashlib
import hmac
import io

from candlecast.errors import ModelIntegrityError, ModelSignatureMismatch


def sign(data: bytes, key: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump(payload: dict) -> bytes:
    """The bytes of a model file: joblib of a plain dict of numbers, strings and numpy arrays."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(payload, buffer, compress=3)
    return buffer.getvalue()


def _same_hex(expected: str, given: str) -> bool:
    """Constant-time comparison that also accepts junk (non-ASCII) input."""
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "replace"))


def verify(data: bytes, signature_hex: str | None, key: bytes, expected_sha256: str | None = None,
           previous_key: bytes | None = None) -> None:
    """Raise ModelIntegrityError unless `data` carries a valid signature (and the expected sha256). During a key
    rotation a signature under `previous_key` is valid too; it is computed only when the current key's fails, so
    a file signed with the current key costs one HMAC."""
    if not key:
        raise ModelIntegrityError("no model signing key is configured; refusing to load the model file")
    if not signature_hex or not signature_hex.strip():
        raise ModelIntegrityError("model file is unsigned (no .sig); refusing to load it")
    if not _same_hex(sign(data, key), signature_hex) and not (
            previous_key and _same_hex(sign(data, previous_key), signature_hex)):
        raise ModelSignatureMismatch(
            "model file signature does not match (tampered file or wrong key); refusing to load it"
        )
    if expected_sha256 is not None and not _same_hex(sha256_hex(data), expected_sha256):
        raise ModelIntegrityError("model file sha256 does not match its models row; refusing to load it")


def load(data: bytes):
    """The ForecastModel in `data`, which the caller has verified."""
    from candlecast.forecast.model import load_model

    try:
        return load_model(data)
    except Exception as error:  # a verified but unreadable file is still not a usable model; its text stays here
        raise ModelIntegrityError(f"model file is verified but cannot be read ({type(error).__name__})") from error


def verify_and_load(data: bytes, signature_hex: str | None, key: bytes, expected_sha256: str | None = None,
                    previous_key: bytes | None = None):
    """The ForecastModel in `data`, after the signature and checksum checks pass."""
    verify(data, signature_hex, key, expected_sha256, previous_key)
    return load(data)
