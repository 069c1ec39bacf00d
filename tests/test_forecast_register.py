"""`train --register`: the shipped model file lands in the bucket and becomes its timeframe's active row."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.s3
@pytest.mark.parametrize("timeframe", ["1d", "1h"])  # a baseline and a combination of the trees with GARCH
def test_register_uploads_and_activates_the_model_under_the_kind_it_ships(clean_db, tmp_path, timeframe):
    import json

    from candlecast import db, storage
    from candlecast.forecast.train import register
    from candlecast.repositories.models import get_active_model_by_timeframe

    for name in (f"{timeframe}.pkl", f"{timeframe}.pkl.sig"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
    entry = json.loads((ROOT / "models" / "manifest.json").read_text())[timeframe]
    (tmp_path / "manifest.json").write_text(json.dumps({timeframe: entry}))
    assert register(entry, tmp_path) == f"{entry['name']} {entry['version']}"
    with db.connection() as conn:
        row = get_active_model_by_timeframe(conn, timeframe)
    assert row["sha256"] == entry["sha256"] and row["kind"] == entry["kind"] == entry["metrics"]["shipped"]
    assert storage.get_bytes(storage.active_model_key(timeframe)) == (tmp_path / f"{timeframe}.pkl").read_bytes()


def test_the_manifests_accuracy_is_the_walk_forward_80_percent_coverage():
    """One meaning of `accuracy` (drift.ACCURACY_DEFINITION): the manifest's is the walk-forward test's 80 %
    coverage, the models row's the same measure live."""
    import json

    from candlecast.drift import ACCURACY_DEFINITION

    manifest = json.loads((ROOT / "models" / "manifest.json").read_text())
    assert manifest
    for timeframe, entry in manifest.items():
        assert entry["metrics"]["accuracy_definition"] == ACCURACY_DEFINITION, timeframe
        assert entry["accuracy"] == entry["metrics"]["test"]["coverage_80"], timeframe
