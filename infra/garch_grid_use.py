"""Where on its (α, β) grid the GARCH part's grid fit lands, per timeframe: the share of origins at each α and β,
with squared-return news and with range news, on the grid and on the wide grid (`TimeframeConfig.garch_wide`).
Piling up on an edge of the grid says the grid is too narrow there.

    PYTHONPATH=layers/common:. python -m infra.garch_grid_use --timeframe 1m [--every 1] [--data DIR]
"""

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from candlecast.forecast import dataset
from candlecast.forecast.features import CONFIGS, range_variances
from candlecast.forecast.garch import grid_choices
from infra.local_stack import SHARED_OHLCV

_CHUNK = 200  # windows per grid fit (memory: windows × grid points × lookback)


def _windows(values: np.ndarray, width: int, at: np.ndarray) -> np.ndarray:
    padded = np.concatenate([np.full(width, np.nan), values])
    return np.lib.stride_tricks.sliding_window_view(padded, width)[at + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeframe", required=True, choices=list(CONFIGS))
    parser.add_argument("--every", type=int, default=50, help="every Nth origin of each series (default 50)")
    parser.add_argument("--data", default=str(SHARED_OHLCV))
    args = parser.parse_args()
    config = CONFIGS[args.timeframe]
    width = config.lookback - 1
    counts = {(news, wide): Counter() for news in ("squared", "range") for wide in (False, True)}
    for _, candles in tqdm(dataset.load_timeframe(Path(args.data), args.timeframe), desc="series", unit="series"):
        log_close = np.log(candles.close)
        returns = np.concatenate([[np.nan], np.diff(log_close)])
        ranges = range_variances(candles, np.diff(log_close, prepend=log_close[0]), np.full(len(candles), np.inf))[1]
        at = np.arange(config.min_history, len(candles), args.every)
        rows, range_rows = _windows(returns, width, at), _windows(ranges, width, at)
        enough = np.isfinite(rows).sum(axis=1) >= 3
        rows, range_rows = rows[enough], range_rows[enough]
        for (news, wide), counter in counts.items():
            for start in range(0, len(rows), _CHUNK):
                chosen = grid_choices(rows[start : start + _CHUNK], wide=wide,
                                      news=range_rows[start : start + _CHUNK] if news == "range" else None)
                counter.update(map(tuple, chosen.tolist()))
    for (news, wide), counter in counts.items():
        total = sum(counter.values())
        share = {name: Counter() for name in ("α", "β")}
        for (alpha, beta), count in counter.items():
            share["α"][alpha] += count / total
            share["β"][beta] += count / total
        print(f"{args.timeframe} {news} news, {'wide' if wide else 'narrow'} grid ({total:,} origins):")
        for name, shares in share.items():
            print(f"  {name}: " + "  ".join(f"{value:g} {part:.3f}" for value, part in sorted(shares.items())))


if __name__ == "__main__":
    main()
