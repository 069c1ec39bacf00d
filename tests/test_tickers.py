"""Ticker normalisation and pair splitting, by hand-written cases."""

import pytest

from candlecast.errors import BadRequest
from candlecast.tickers import KNOWN_QUOTES, MAX_TICKER_LENGTH, compact_pair, normalize_ticker, split_pair, storage_name


@pytest.mark.parametrize(("ticker", "expected"), [
    ("X:BTCUSDT", ("BTC", "USDT")),  # USDT before USD: not BTCUSD/T
    ("X:BTCUSD", ("BTC", "USD")),
    ("X:ETHBTC", ("ETH", "BTC")),
    ("X:SOLUSDC", ("SOL", "USDC")),
    ("X:XRPBUSD", ("XRP", "BUSD")),
    ("X:TRXTUSD", ("TRX", "TUSD")),
    ("X:ADAEUR", ("ADA", "EUR")),
    ("X:DOTGBP", ("DOT", "GBP")),
    ("X:SHIBJPY", ("SHIB", "JPY")),
    ("X:LINKETH", ("LINK", "ETH")),
    ("X:CAKEBNB", ("CAKE", "BNB")),
    ("X:1INCHUSDT", ("1INCH", "USDT")),
    ("ETHUSD", ("ETH", "USD")),  # without the prefix
    ("X:USDT", ("U", "SDT")),  # the whole pair is a known quote: no empty base, the three-letter fallback
    ("X:ABCXYZ", ("ABC", "XYZ")),  # unknown quote: the last three letters
    ("X:ABCDWXYZ", ("ABCDW", "XYZ")),
])
def test_split_pair(ticker, expected):
    assert split_pair(ticker) == expected


def test_known_quotes_are_tried_longest_first():
    assert list(KNOWN_QUOTES) == sorted(KNOWN_QUOTES, key=len, reverse=True)


@pytest.mark.parametrize(("raw", "expected"), [
    ("X:BTCUSD", "X:BTCUSD"), ("BTCUSD", "X:BTCUSD"), ("btc-usd", "X:BTCUSD"), ("BTC/USD", "X:BTCUSD"),
    ("btc_usd", "X:BTCUSD"), ("x:eth-usdt", "X:ETHUSDT"), ("  sol-usd ", "X:SOLUSD"), ("AB", "X:AB"),
    ("A" * 24, "X:" + "A" * 24),
])
def test_normalize_ticker(raw, expected):
    assert normalize_ticker(raw) == expected


SHAPE = "ticker must look like X:BTCUSD, BTCUSD or BTC-USD (letters and digits only)"


@pytest.mark.parametrize(("raw", "message"), [
    ("A", SHAPE), ("A" * 25, SHAPE), ("BTC.USD", SHAPE), ("BTC USD", SHAPE), ("", SHAPE), ("X:", SHAPE),
    ("B" * (MAX_TICKER_LENGTH + 1), "ticker is longer than 32 characters"),
])
def test_bad_tickers_are_refused_naming_the_problem(raw, message):
    with pytest.raises(BadRequest) as refused:
        normalize_ticker(raw)
    assert refused.value.code == "invalid_ticker"
    assert refused.value.status == 400
    assert refused.value.message == message


def test_a_ticker_of_exactly_the_maximum_length_is_measured_not_refused():
    raw = "X:" + "A" * 12 + "-" * 6 + "B" * 12  # 32 characters, 24 letters
    assert len(raw) == MAX_TICKER_LENGTH
    assert normalize_ticker(raw) == "X:" + "A" * 12 + "B" * 12


def test_compact_pair_and_storage_name():
    assert compact_pair(" x:Btc-u/s_d ") == "BTCUSD"
    assert compact_pair("X:ETHUSD") == "ETHUSD"
    assert storage_name("X:BTCUSDT") == "BTCUSDT"
    assert storage_name("BTCUSDT") == "BTCUSDT"
