"""Page cursors for the list routes: `cursor` in the query, the next page's in the `X-Next-Cursor` header.

A cursor names the offset of the next page (`o40`); pass it back as it came. A full page carries a next
cursor (the page after the last full one may be empty); a shorter page is the last, and so is the page that
reaches 10,000 rows. Rows added between calls can shift later pages.
"""

import json
import re
from dataclasses import dataclass

from candlecast.errors import BadRequest

# Every row before a page is read and dropped: pages stop at 10,000 rows, so that a forged deep cursor costs
# milliseconds (a cursor of a million rows cost 200-350 ms of database time on one symbol's 300k predictions).
MAX_OFFSET = 9_999
CURSOR_PATTERN = r"^o[0-9]{1,4}$"
NEXT_CURSOR_HEADER = {"X-Next-Cursor": {"description": "pass it as `cursor` for the next page; absent on the last",
                                        "schema": {"type": "string", "pattern": CURSOR_PATTERN}}}


@dataclass(frozen=True)
class Page:
    """A JSON list and the cursor of the page after it."""

    body: bytes
    next_cursor: str | None

    @classmethod
    def of(cls, body: bytes, offset: int, limit: int, length: int | None = None) -> "Page":
        length = len(json.loads(body)) if length is None else length
        return cls(body, next_cursor(offset, limit, length))

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Next-Cursor": self.next_cursor} if self.next_cursor else {}


def encode_cursor(offset: int) -> str:
    return f"o{offset}"


def decode_cursor(cursor: str | None) -> int:
    """The offset a cursor stands for (0 without one), or BadRequest `invalid_cursor`."""
    if not cursor:
        return 0
    if not re.fullmatch(CURSOR_PATTERN, cursor, re.ASCII):
        raise BadRequest("cursor is not one this API gave out: pass X-Next-Cursor as it is", code="invalid_cursor")
    return int(cursor[1:])


def next_cursor(offset: int, limit: int, page_length: int) -> str | None:
    """The cursor of the page after a full one; None after a short (last) page."""
    if page_length < limit or offset + limit > MAX_OFFSET:
        return None
    return encode_cursor(offset + limit)
