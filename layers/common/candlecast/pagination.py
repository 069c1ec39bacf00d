"""Page cursors for the list routes: `cursor` in the query, the next page's in the `X-Next-Cursor` header.

Pages are keyset (seek) pages: a cursor holds the sort values of the last row a page showed, as that page
showed them, and the next page starts after them, through the list's index, so the page at a million rows deep
costs what the first does. A full page carries a next cursor (the page after the last full one may be empty); a
shorter page is the last. Rows added, or re-sorted (a symbol's volume changes), between calls never shift the
others: each row whose sort values stay put is shown once, in order; a row is shown where its values put it when
its page is read.

A cursor is opaque (base64url) and tamper-evident: a digest of its list (the route and its parameters) and its
position. Whatever is not a cursor of this list and this release (malformed, an older release's format, altered, too
long, given out for another list) is a 400 `invalid_cursor` telling the client to start the list again without one:
the routes document the cursor's pattern but leave its check here, so that no cursor answers the generic
`invalid_request`. The digest is
not a secret's MAC, on purpose: a forged cursor can only start a page at a position of the forger's choosing in a
list the forger may read whole anyway (the routes are public), every position costs one index seek and at most
`limit` rows, and a value the database could not take is refused. A secret would add a Secrets Manager read to
the symbols function's cold start and end every cursor in use at each rotation, for nothing.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from candlecast.errors import BadRequest

# 12 bytes of digest and the position, in base64url without padding; positions are a few strings, the longest a
# symbol's name (200 characters at most, each up to 6 bytes in JSON).
MIN_CURSOR_LENGTH, MAX_CURSOR_LENGTH = 20, 2048
CURSOR_PATTERN = rf"^[A-Za-z0-9_-]{{{MIN_CURSOR_LENGTH},{MAX_CURSOR_LENGTH}}}$"
NEXT_CURSOR_HEADER = {"X-Next-Cursor": {"description": "pass it as `cursor` for the next page; absent on the last",
                                        "schema": {"type": "string", "pattern": CURSOR_PATTERN}}}
_DIGEST_BYTES = 12
_DIGEST_KEY = b"candlecast cursor v1"


@dataclass(frozen=True)
class Page:
    """A JSON list and the cursor of the page after it."""

    body: bytes
    next_cursor: str | None

    @classmethod
    def of(cls, body: bytes, limit: int, scope: str, position: Callable[[dict], Sequence[str]],
           rows: list[dict]) -> "Page":
        """The page of `body`, made of `rows`; its next cursor holds `position` of the last row, from the row as
        the database gave it (a body's JSON numbers may be rounded)."""
        if len(rows) < limit or not rows:
            return cls(body, None)
        return cls(body, encode_cursor(scope, position(rows[-1])))

    def packed(self) -> bytes:
        """The page as one value, for the cache: its cursor, a newline, its body."""
        return (self.next_cursor or "").encode("ascii") + b"\n" + self.body

    @classmethod
    def unpacked(cls, value: bytes | None) -> "Page | None":
        """A page from `packed`; None for no value or one that is not a packed page."""
        cursor, newline, body = (value or b"").partition(b"\n")
        if not newline or not (cursor == b"" or re.fullmatch(CURSOR_PATTERN.encode(), cursor)):
            return None
        return cls(body, cursor.decode("ascii") or None)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Next-Cursor": self.next_cursor} if self.next_cursor else {}


def _digest(scope: str, payload: bytes) -> bytes:
    return hashlib.blake2b(scope.encode() + b"\0" + payload, key=_DIGEST_KEY, digest_size=_DIGEST_BYTES).digest()


def encode_cursor(scope: str, position: Sequence[str]) -> str:
    payload = json.dumps([str(value) for value in position], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(_digest(scope, payload) + payload).rstrip(b"=").decode("ascii")


def invalid_cursor() -> BadRequest:
    # One answer for every bad cursor: an older release's cursors (another format, or another digest) are as
    # unusable as an altered one, and the client's way on is the same.
    return BadRequest("cursor is not valid for this list or this release of the API: start the list again without a "
                      "cursor, then pass each X-Next-Cursor as it is, with the same query, symbol and timeframe",
                      code="invalid_cursor")


def decode_cursor(scope: str, cursor: str | None, size: int) -> list[str] | None:
    """The position (`size` strings) a cursor of this list holds; None without one; else `invalid_cursor` (an empty
    cursor too: a client that sent one after the last page would otherwise start the list over and over)."""
    if cursor is None:
        return None
    if len(cursor) > MAX_CURSOR_LENGTH or not re.fullmatch(CURSOR_PATTERN, cursor, re.ASCII):
        raise invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise invalid_cursor() from None
    digest, payload = raw[:_DIGEST_BYTES], raw[_DIGEST_BYTES:]
    if not hmac.compare_digest(digest, _digest(scope, payload)):
        raise invalid_cursor()
    try:
        position = json.loads(payload)
    except ValueError:
        raise invalid_cursor() from None
    if not (isinstance(position, list) and len(position) == size and all(map(storable, position))):
        raise invalid_cursor()
    return position


def storable(value: object) -> bool:
    """A string the database can take: UTF-8 (no lone surrogate, which JSON can spell) and no NUL."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
