"""`infra.exchange_check`: which exchange each series comes from, and when the normal walk-forward already tests an
exchange unseen (its own reruns rely on `walk_forward(test_only=...)`, tested in test_forecast_leakage.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from candlecast.forecast.dataset import Series, list_series, sources_for
from infra.exchange_check import exchanges_of, unseen_already


def series(name: str) -> tuple[Series, None]:
    return Series(name.split("_")[0].replace("-", ""), name.split("-")[0], "USD", "1d", Path(name), "csv"), None


def test_every_series_is_named_by_its_files_exchange_and_an_unknown_file_stops_the_check(tmp_path):
    provenance = tmp_path / "provenance.json"
    provenance.write_text(json.dumps([{"file": "ohlcv/AAA-USD_1d.csv", "exchange": "One"},
                                      {"file": "ohlcv/BBB-USDT_1h.csv", "exchange": "Two"}]))
    assert list(exchanges_of([series("BBB-USDT_1h.csv"), series("AAA-USD_1d.csv")], provenance)) == ["Two", "One"]
    with pytest.raises(SystemExit, match=r"CCC-USD_1d\.csv"):
        exchanges_of([series("AAA-USD_1d.csv"), series("CCC-USD_1d.csv")], provenance)


def test_an_exchange_is_unseen_already_only_when_one_held_out_group_holds_all_of_its_series():
    groups = [np.array([True, True, False, False]), np.array([False, False, True, True])]
    assert unseen_already(np.array([True, True, False, False]), groups)
    assert unseen_already(np.array([False, False, False, True]), groups)
    assert not unseen_already(np.array([False, True, True, False]), groups)


@pytest.mark.shared
@pytest.mark.parametrize("timeframe", ["1h", "1d"])
def test_every_shared_series_has_an_exchange(shared_data, timeframe):
    chosen = [(item, None) for item in sources_for(list_series(shared_data / "ohlcv"), timeframe)]
    names = exchanges_of(chosen, shared_data / "ohlcv_provenance.json")
    assert len(names) == len(chosen) and len(set(names)) >= 2
