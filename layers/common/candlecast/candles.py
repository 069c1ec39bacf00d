"""Candles as column arrays (numpy), oldest first. Imported only by code paths that need numpy."""

from dataclasses import dataclass

import numpy as np

COLUMNS = ("open_time", "open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class Candles:
    open_time: np.ndarray  # int64 epoch seconds, UTC, candle open time
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def __len__(self) -> int:
        return len(self.open_time)

    def tail(self, count: int) -> "Candles":
        return Candles(*(getattr(self, name)[-count:] for name in COLUMNS))

    def to_dict(self) -> dict[str, list]:
        return {name: getattr(self, name).tolist() for name in COLUMNS}

    @classmethod
    def from_dict(cls, columns: dict) -> "Candles":
        return cls(
            open_time=np.asarray(columns["open_time"], dtype=np.int64),
            **{name: np.asarray(columns[name], dtype=np.float64) for name in COLUMNS[1:]},
        )
