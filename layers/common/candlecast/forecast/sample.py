"""`candlecast build-sample`: the committed sample under data/ (bucket layout) and data/symbols.csv."""

import csv
import json
from pathlib import Path

import numpy as np

from candlecast.candles import COLUMNS, Candles
from candlecast.forecast.dataset import Series, list_series, read_ohlcv, resample
from candlecast.tickers import normalize_ticker, storage_name
from candlecast.timeframes import TIMEFRAMES

SAMPLE_PAIRS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XMRUSD")  # three hourly Binance pairs, one daily-only pair
SAMPLE_CANDLES = 600  # newest candles kept per timeframe for SAMPLE_PAIRS
# Every other listed pair gets a short tail, enough for any model's lookback (at most 193), so each
# symbol the sample lists can be forecast at each timeframe its data gives.
LISTED_CANDLES = 220
ROW_GROUP_SIZE = 1024
SYMBOL_COLUMNS = ("ticker", "name", "base_currency", "quote_currency", "volume_24h", "volume_rank", "source")
COIN_NAMES = {
    "AAVE": "Aave", "ADA": "Cardano", "BAT": "Basic Attention Token", "BNB": "BNB", "BTC": "Bitcoin",
    "BTT": "BitTorrent", "CELR": "Celer Network", "CRO": "Cronos", "DASH": "Dash", "DOT": "Polkadot",
    "EOS": "EOS", "ETC": "Ethereum Classic", "ETH": "Ethereum", "ICP": "Internet Computer", "LTC": "Litecoin",
    "MATIC": "Polygon", "MIOTA": "IOTA", "NEO": "NEO", "ONE": "Harmony", "QTUM": "Qtum", "SOL": "Solana",
    "TRX": "TRON", "UNI": "Uniswap", "XEM": "NEM", "XMR": "Monero", "XRP": "XRP",
}


def write_parquet(candles: Candles, path: Path) -> None:
    """Candles as Parquet: open_time int64 epoch seconds, OHLCV float64, row groups of ~1024 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: getattr(candles, name) for name in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE, compression="zstd")


def derived_timeframes(series: Series) -> tuple:
    return TIMEFRAMES[TIMEFRAMES.index(series.timeframe) :]


def quote_volume_24h(series: Series, candles: Candles) -> float:
    """Quote-currency volume of the last 24 hours of data: hourly files hold base volume (× close)."""
    if series.timeframe == "1h":
        recent = candles.open_time > candles.open_time[-1] - 86400
        return float(np.sum(candles.volume[recent] * candles.close[recent]))
    return float(candles.volume[-1])


def _sources(source_dir: Path) -> dict[str, str]:
    """File name -> exchange, from ohlcv_provenance.json beside the folder when present."""
    provenance = source_dir.parent / "ohlcv_provenance.json"
    if not provenance.exists():
        return {}
    return {Path(item["file"]).name: f"{item['exchange']} via {item['data_via']}"
            for item in json.loads(provenance.read_text())}


def build_sample(source_dir: Path, out_dir: Path, pairs=SAMPLE_PAIRS, keep: int = SAMPLE_CANDLES,
                 progress: bool = True, keep_listed: int = LISTED_CANDLES) -> dict:
    """Write the sample Parquet files and symbols.csv; returns {'files': [...], 'symbols': n}."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    series_list = list_series(source_dir)
    if not series_list:
        raise SystemExit(f"no OHLCV files under {source_dir}")
    sources = _sources(source_dir)
    items = series_list
    if progress:
        from tqdm import tqdm

        items = tqdm(series_list, desc="build-sample", unit="file")
    symbols: dict[str, dict] = {}
    chosen: dict[tuple[str, str], tuple[int, Series, Candles]] = {}  # (ticker, tf) -> the freshest source
    for series in items:
        candles = read_ohlcv(series.path)
        ticker = normalize_ticker(series.pair)
        row = {
            "ticker": ticker,
            "name": COIN_NAMES.get(series.base, series.base),
            "base_currency": series.base,
            "quote_currency": series.quote,
            "volume_24h": round(quote_volume_24h(series, candles), 2),
            "source": sources.get(series.path.name, series.path.name),
            "_last": int(candles.open_time[-1]),
        }
        current = symbols.get(ticker)
        if current is None or row["_last"] > current["_last"]:  # the freshest file of a pair describes it
            symbols[ticker] = row
        for timeframe in derived_timeframes(series):
            current = chosen.get((ticker, timeframe))
            if current is None or row["_last"] > current[0]:
                chosen[(ticker, timeframe)] = (row["_last"], series, candles)
    written = []
    for (ticker, timeframe), (_, series, candles) in sorted(chosen.items()):
        path = out_dir / storage_name(ticker) / f"{timeframe}.parquet"
        tail = keep if series.pair in pairs else keep_listed
        write_parquet(resample(candles, series.timeframe, timeframe).tail(tail), path)
        written.append(str(path))
    ranked = sorted(symbols.values(), key=lambda row: -row["volume_24h"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "symbols.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SYMBOL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for rank, row in enumerate(ranked, start=1):
            writer.writerow(row | {"volume_rank": rank})
    return {"files": written, "symbols": len(ranked)}
