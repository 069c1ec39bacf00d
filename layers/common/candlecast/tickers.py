"""Ticker normalisation: `X:BTCUSD`, `BTCUSD`, `BTC-USD`, `btc/usd` all name the symbol `X:BTCUSD`."""

import re
import string

from candlecast.errors import BadRequest

MAX_TICKER_LENGTH = 32
# What the API documents as a ticker (`pattern` in OpenAPI): base and quote, at most one separator, 2 to 24
# letters and digits. normalize_ticker accepts every such string (and a few more: surrounding blanks, more
# separators).
TICKER_PATTERN = r"^(?:[Xx]:)?[A-Za-z0-9]{1,12}[-/_]?[A-Za-z0-9]{1,12}$"
# A ticker in a path: no "/", which API Gateway decodes from %2F into a separator (no route has two segments there).
PATH_TICKER_PATTERN = TICKER_PATTERN.replace("[-/_]", "[-_]")
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_PAIR = re.compile(r"[A-Z0-9]{2,24}")  # always fullmatch: `$` would accept a trailing newline
# Longest first, so that BTCUSDT splits as BTC/USDT, not BTCUSD/T.
KNOWN_QUOTES = ("USDT", "USDC", "BUSD", "TUSD", "USD", "EUR", "GBP", "JPY", "BTC", "ETH", "BNB")


def compact_pair(raw: str) -> str:
    """`x:btc-usd`, `BTC/USD`, `btc_usd` -> `BTCUSD`: upper case, no `X:` prefix, no separators.

    Only ASCII is folded: `str.upper` would turn `ſ` into `S` and `ﬀ` into `FF`, naming another symbol.
    """
    if not raw.isascii():
        return raw
    return raw.strip(" ").upper().removeprefix("X:").replace("-", "").replace("/", "").replace("_", "")


def ascii_upper(text: str) -> str:
    """`text` with its ASCII letters upper-cased and every other character as it is."""
    return text.translate(_ASCII_UPPER)


def ascii_lower(text: str) -> str:
    """`text` with its ASCII letters lower-cased and every other character as it is."""
    return text.translate(_ASCII_LOWER)


def is_ticker_like(text: str) -> bool:
    """ASCII letters and digits only (str.isalnum also accepts other scripts' letters and digits)."""
    return text.isascii() and text.isalnum()


def normalize_ticker(raw: str) -> str:
    """The canonical ticker (Polygon's `X:` form), or BadRequest naming what is wrong."""
    if len(raw) > MAX_TICKER_LENGTH:
        raise BadRequest(f"ticker is longer than {MAX_TICKER_LENGTH} characters", code="invalid_ticker")
    pair = compact_pair(raw)
    if not raw.isascii() or not _PAIR.fullmatch(pair):
        raise BadRequest(
            "ticker must look like X:BTCUSD, BTCUSD or BTC-USD (letters and digits only)", code="invalid_ticker"
        )
    return f"X:{pair}"


def split_pair(ticker: str) -> tuple[str, str]:
    """(base, quote) of a canonical ticker, e.g. X:ETHUSDT -> (ETH, USDT)."""
    pair = ticker.removeprefix("X:")
    for quote in KNOWN_QUOTES:
        if pair.endswith(quote) and len(pair) > len(quote):
            return pair[: -len(quote)], quote
    return pair[:-3], pair[-3:]


def storage_name(ticker: str) -> str:
    """The symbol's folder name in the bucket and under data/: `X:BTCUSD` -> `BTCUSD`."""
    return ticker.removeprefix("X:")
