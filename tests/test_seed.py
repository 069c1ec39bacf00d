"""`candlecast seed`: symbols upserted, data/ and models/ uploaded, models registered; twice is the same as once."""

import argparse
import functools
import hashlib
import json
import uuid
from pathlib import Path

import pytest

from candlecast.config import LOCAL_MODEL_SIGNING_KEY
from candlecast.forecast.artifact import sign
from infra.local_stack import create_bucket

pytestmark = [pytest.mark.integration, pytest.mark.s3]

SYMBOLS_CSV = """ticker,name,base_currency,quote_currency,volume_24h,volume_rank,source
X:ZZSEEDUSDT,Zz Seed Coin,ZZSEED,USDT,12345.5,1,test
ZZOTHER-USD,Zz Other Coin,ZZOTHER,USD,,,test
"""


@pytest.fixture
def seed_bucket(clean_db, monkeypatch):
    """A bucket of its own, chosen the way the CLI's --bucket does (DATA_BUCKET), so no other test sees it."""
    from candlecast.config import get_settings

    bucket = f"candlecast-seed-{uuid.uuid4().hex[:12]}"
    create_bucket(clean_db.s3_endpoint_url, bucket)
    monkeypatch.setenv("DATA_BUCKET", bucket)
    get_settings.cache_clear()
    yield bucket
    monkeypatch.undo()
    get_settings.cache_clear()


def candle_file(start: int, step: int, rows: int = 50) -> bytes:
    """Parquet candles opening at `start` + k * `step`, as data/ holds them."""
    import numpy as np

    from candlecast import storage
    from candlecast.candles import Candles

    close = 1.0 + 0.01 * (np.arange(rows) % 7)
    return storage.candles_to_parquet(Candles(open_time=start + step * np.arange(rows, dtype=np.int64),
                                              open=close, high=close * 1.01, low=close * 0.99, close=close,
                                              volume=np.ones(rows)))


@functools.cache
def model_bytes(timeframe: str = "1h", name: str = "seed-test-1h", version: str = "20260101T000000") -> bytes:
    """A real model file: the committed `timeframe` model's payload, naming `name` and `version`."""
    from candlecast.forecast import artifact
    from tests.forecast_checks import shipped_model

    return artifact.dump({**shipped_model(timeframe).payload, "name": name, "version": version})


@pytest.fixture
def sample(tmp_path):
    data, models = tmp_path / "data", tmp_path / "models"
    (data / "ZZSEEDUSDT").mkdir(parents=True)
    (data / "symbols.csv").write_text(SYMBOLS_CSV)
    (data / "ZZSEEDUSDT" / "1h.parquet").write_bytes(candle_file(1_600_000_000 - 1_600_000_000 % 3600, 3600))
    models.mkdir()
    model = model_bytes()
    (models / "1h.pkl").write_bytes(model)
    (models / "1h.pkl.sig").write_text(sign(model, LOCAL_MODEL_SIGNING_KEY.encode()))
    manifest = {"1h": {"name": "seed-test-1h", "version": "20260101T000000", "kind": "learned",
                       "sha256": hashlib.sha256(model).hexdigest(), "accuracy": 0.61,
                       "metrics": {"coverage_80": 0.8}, "features": ["r1", "r2"],
                       "train_start": "2020-01-01T00:00:00Z", "train_end": "2025-01-01T00:00:00Z"}}
    (models / "manifest.json").write_text(json.dumps(manifest))
    return data, models


def _cli(*argv: str) -> int:
    from candlecast import seed

    parser = argparse.ArgumentParser()
    seed.register(parser.add_subparsers())
    args = parser.parse_args(["seed", *argv])
    return args.func(args)


def _state() -> dict:
    from candlecast import db, storage

    with db.connection() as conn:
        symbols = conn.execute("SELECT ticker, name, volume_24h, volume_rank, metadata FROM symbols "
                               "WHERE ticker LIKE 'X:ZZ%' ORDER BY ticker").fetchall()
        models = conn.execute("SELECT timeframe, name, version, kind, s3_key, sha256, accuracy, metrics, features, "
                              "train_start, is_active FROM models ORDER BY name").fetchall()
    return {"symbols": symbols, "models": models, "keys": sorted(storage.list_keys(""))}


def test_seed_loads_everything_and_is_idempotent(seed_bucket, sample):
    data, models = sample
    assert _cli("--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet",
                "--no-track-record") == 0
    first = _state()

    assert [row["ticker"] for row in first["symbols"]] == ["X:ZZOTHERUSD", "X:ZZSEEDUSDT"]
    seeded = first["symbols"][1]
    assert (seeded["name"], float(seeded["volume_24h"]), seeded["volume_rank"]) == ("Zz Seed Coin", 12345.5, 1)
    assert seeded["metadata"] == {"source": "test", "candle_timeframes": ["1h"]}  # what data/ holds for it
    assert first["symbols"][0]["volume_24h"] is None

    assert first["keys"] == [
        "data/ZZSEEDUSDT/1h.parquet", "data/symbols.csv",
        "models/1h.pkl", "models/1h.pkl.sig",
        "models/1h/20260101T000000.pkl", "models/1h/20260101T000000.pkl.sig",
    ]
    from candlecast import storage

    assert storage.get_bytes("models/1h.pkl") == model_bytes()
    assert storage.get_bytes("models/1h/20260101T000000.pkl") == model_bytes()

    [model] = first["models"]
    assert model["s3_key"] == storage.versioned_model_key("1h", "20260101T000000")
    assert model["sha256"] == hashlib.sha256(model_bytes()).hexdigest()
    assert (model["name"], model["version"], model["kind"], model["is_active"]) == (
        "seed-test-1h", "20260101T000000", "learned", True)
    assert model["features"] == ["r1", "r2"] and model["metrics"] == {"coverage_80": 0.8}
    assert model["train_start"].year == 2020

    _cli("--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet", "--no-track-record")
    assert _state() == first


def test_seeding_again_keeps_the_live_accuracy_scoring_set(seed_bucket, sample):
    from candlecast import db

    data, models = sample
    local = ["--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet", "--no-track-record"]
    _cli(*local)
    with db.connection() as conn:
        conn.execute("UPDATE models SET accuracy = 0.79 WHERE name = 'seed-test-1h'")  # as scoring sets it
    _cli(*local)
    with db.connection() as conn:
        assert conn.execute("SELECT accuracy FROM models WHERE name = 'seed-test-1h'").fetchone()["accuracy"] == 0.79


@pytest.mark.parametrize("where", ["missing", "a file", "no symbols.csv"])
def test_a_data_directory_that_is_not_one_is_refused_before_any_change(seed_bucket, sample, capsys, where):
    from candlecast import cli

    data, models = sample
    if where == "missing":
        data, expected = data.parent / "nonexistent", f"{data.parent / 'nonexistent'}: no such directory"
    elif where == "a file":
        data, expected = data / "symbols.csv", f"{data / 'symbols.csv'}: not a directory"
    else:
        (data / "symbols.csv").unlink()
        expected = f"no symbols.csv in {data}"
    assert cli.main(["seed", "--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"candlecast seed: {expected}") and "seeded" not in captured.out
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])


@pytest.mark.parametrize("bad", ["not parquet", "1d at 04:00Z", "1h a year ahead"])
def test_a_candle_file_every_read_would_refuse_is_refused_before_any_change(seed_bucket, sample, capsys, bad):
    """Audit N: seed uploaded data/ as it was, so a 1d file of Polygon's daily bars stamped at US/Eastern midnight
    (04:00Z) or a 1h file dated a year ahead went into the bucket, and every forecast from it was a 503
    candle_file_invalid. Seed checks each candle file with the read path's own check first."""
    import time

    from candlecast import cli

    data, models = sample
    if bad == "not parquet":
        name, content = "1h.parquet", b"PAR1 not really parquet PAR1"
    elif bad == "1d at 04:00Z":
        name, content = "1d.parquet", candle_file(1_600_041_600 + 4 * 3600, 86400)  # 2020-09-14T04:00Z
    else:
        hour = int(time.time()) // 3600 * 3600
        name, content = "1h.parquet", candle_file(hour + 365 * 86400, 3600)
    (data / "ZZSEEDUSDT" / name).write_bytes(content)
    assert cli.main(["seed", "--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"candlecast seed: 1 candle files in {data} are not usable")
    assert f"ZZSEEDUSDT/{name}: " in captured.err and "nothing seeded" in captured.err
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])


def test_a_model_file_that_does_not_match_its_manifest_is_refused(seed_bucket, sample):
    from candlecast.seed import seed

    data, models = sample
    (models / "1h.pkl").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        seed(data, models, progress=False)
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])  # refused before any change


def test_a_manifest_holding_nan_is_refused_before_any_change(seed_bucket, sample):
    """NaN is not JSON and PostgreSQL's jsonb refuses it: a manifest written before `train` wrote an untested
    horizon's coverage as null is refused by name, not half-seeded."""
    from candlecast.seed import seed

    data, models = sample
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["1h"]["metrics"]["per_horizon"] = [{"h": 1, "coverage_80": 0.8}, {"h": 2, "coverage_80": float("nan")}]
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json holds NaN, which is not JSON"):
        seed(data, models, progress=False)
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])


@pytest.mark.parametrize("version", ["2026/12", "../1d", ".hidden", "v 2"])
def test_a_version_that_is_not_one_key_segment_is_refused_before_any_change(seed_bucket, sample, version):
    """Audit: a version holding `/` was registered, its file nested under another key of models/."""
    from candlecast.seed import seed

    data, models = sample
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["1h"]["version"] = version
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version: String should match pattern"):
        seed(data, models, progress=False)
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])


@pytest.mark.parametrize("shape", ["1H", "daily", "list without timeframe"])
def test_a_manifest_model_under_no_timeframe_is_refused_before_any_change(seed_bucket, sample, shape):
    """A release whose manifest names a model by something other than a timeframe would install without it."""
    from candlecast.seed import seed

    data, models = sample
    entry = json.loads((models / "manifest.json").read_text())["1h"]
    manifest = [entry] if shape.startswith("list") else {"1h": entry, shape: {**entry, "version": "2"}}
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json names models by (1H|daily|None), which are no timeframes"):
        seed(data, models, progress=False)
    state = _state()
    assert (state["models"], state["symbols"], state["keys"]) == ([], [], [])


def test_a_deployment_key_needs_resign_which_signs_with_that_key(seed_bucket, sample, monkeypatch):
    from candlecast import storage
    from candlecast.config import get_settings
    from candlecast.seed import seed

    data, models = sample
    monkeypatch.setenv("MODEL_SIGNING_KEY", "the-deployment-key")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match=r"1h: signature: .*--resign"):
        seed(data, models, progress=False)
    assert _state()["keys"] == []  # refused before any change

    seed(data, models, progress=False, resign=True)
    for key in ("models/1h.pkl", "models/1h/20260101T000000.pkl"):
        uploaded = storage.get_bytes(storage.signature_key(key)).decode()
        assert uploaded == sign(model_bytes(), b"the-deployment-key")
    assert (models / "1h.pkl.sig").read_text() == sign(model_bytes(), LOCAL_MODEL_SIGNING_KEY.encode())


def test_resign_signs_only_a_file_the_manifest_gives_the_sha256_of(seed_bucket, sample, monkeypatch):
    """Nothing else vouches for the file --resign would sign (and install-models then load)."""
    from candlecast.config import get_settings
    from candlecast.seed import install_models

    _, models = sample
    manifest = json.loads((models / "manifest.json").read_text())
    del manifest["1h"]["sha256"]
    (models / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MODEL_SIGNING_KEY", "the-deployment-key")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match=r"1h: signature: .* the manifest gives no sha256"):
        install_models(models, progress=False, resign=True)
    assert _state()["keys"] == []


def test_a_missing_bucket_or_a_foreign_key_is_one_line_from_the_cli(seed_bucket, sample, monkeypatch, capsys):
    from candlecast import cli
    from candlecast.config import get_settings

    data, models = sample
    local = ["--data", str(data), "--models", str(models), "--quiet", "--no-track-record"]
    assert cli.main(["seed", "--bucket", "candlecast-no-such-bucket", *local]) == 1
    err = capsys.readouterr().err
    assert err.startswith("candlecast seed: ") and "candlecast-no-such-bucket" in err and "Traceback" not in err

    monkeypatch.setenv("MODEL_SIGNING_KEY", "the-deployment-key")
    get_settings.cache_clear()
    assert cli.main(["seed", "--bucket", seed_bucket, *local]) == 1
    err = capsys.readouterr().err
    assert err.startswith("candlecast seed: ") and "--resign" in err and "(UnusableInput)" in err
    assert "the-deployment-key" not in err and "Traceback" not in err


def test_seeding_again_keeps_the_candle_files_the_bucket_holds(seed_bucket, sample, capsys):
    """Audit V: after an upgrade, seeding again (then the only way to register a release's models) uploaded data/
    over the bucket: a 1d file Refresh had kept current through 2026-12 went back to the sample's 220 rows ending
    2021-07. Seed uploads only the files the bucket does not hold, and says how many it kept."""
    from candlecast import storage

    data, models = sample
    local = ["--bucket", seed_bucket, "--data", str(data), "--models", str(models), "--quiet", "--no-track-record"]
    assert _cli(*local) == 0
    sampled = storage.read_all_candles("X:ZZSEEDUSDT", "1h")
    longer = storage.parquet_to_candles(candle_file(int(sampled.open_time[0]), 3600, rows=80))
    storage.write_candles("X:ZZSEEDUSDT", "1h", longer)  # as Refresh extends it
    capsys.readouterr()

    assert _cli(*local) == 0
    assert len(storage.read_all_candles("X:ZZSEEDUSDT", "1h")) == 80
    out = capsys.readouterr().out
    assert "uploaded 0 data (kept 2 the bucket holds already; `candlecast put-candles` replaces a candle file)" in out


def test_install_models_registers_the_models_and_touches_nothing_else(seed_bucket, sample, capsys):
    from candlecast import cli

    _, models = sample
    assert cli.main(["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]) == 0
    assert "active models: 1h: seed-test-1h 20260101T000000" in capsys.readouterr().out
    state = _state()
    assert state["keys"] == ["models/1h.pkl", "models/1h.pkl.sig",
                             "models/1h/20260101T000000.pkl", "models/1h/20260101T000000.pkl.sig"]
    assert state["symbols"] == []
    [model] = state["models"]
    assert (model["name"], model["kind"], model["is_active"]) == ("seed-test-1h", "learned", True)

    (models / "1h.pkl").write_bytes(b"tampered")
    assert cli.main(["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]) == 1
    assert "sha256" in capsys.readouterr().err
    assert _state() == state  # refused before any change


def test_an_install_that_fails_midway_still_drops_the_cached_model_answers(seed_bucket, sample, capsys, monkeypatch):
    """Audit: an install-models interrupted after registering 1h and before 1d dropped no cached answer: GET /models
    named the models before it for 10 minutes while creates used the new one."""
    from candlecast import cache, cli, seed

    _, models = sample
    _add_model(models, "1d", model_bytes("1d", "seed-test-1d", "20260201T000000"))
    real_put, puts, dropped = seed._put_model, [], []

    def put_failing_at_the_second_model(key, model_file, signature):
        puts.append(key)
        if len(puts) == 3:  # 1h's versioned file and its active copy went; 1d's versioned file does not
            raise KeyboardInterrupt
        real_put(key, model_file, signature)

    monkeypatch.setattr(seed, "_put_model", put_failing_at_the_second_model)
    monkeypatch.setattr(cache, "invalidate_track_record", lambda real=cache.invalidate_track_record: dropped.append(
        True) or real())
    assert cli.main(["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]) == 130
    assert [model["name"] for model in _state()["models"]] == ["seed-test-1h"]
    assert dropped == [True]


def _add_model(models, timeframe: str, data: bytes, **entry) -> dict:
    """`data` as models/{timeframe}.pkl, signed with the local key, and its manifest entry (`entry` over a good one;
    None drops a field)."""
    (models / f"{timeframe}.pkl").write_bytes(data)
    (models / f"{timeframe}.pkl.sig").write_text(sign(data, LOCAL_MODEL_SIGNING_KEY.encode()))
    good = {"name": f"seed-test-{timeframe}", "version": "20260201T000000", "kind": "learned",
            "sha256": hashlib.sha256(data).hexdigest()}
    manifest = json.loads((models / "manifest.json").read_text())
    manifest[timeframe] = {name: value for name, value in {**good, **entry}.items() if value is not None}
    (models / "manifest.json").write_text(json.dumps(manifest))
    return manifest[timeframe]


def test_the_same_file_with_another_training_window_or_kind_is_refused(seed_bucket, sample, capsys):
    """Audit: registering a release again overwrote the row's kind and training window with the manifest's, exit 0:
    a train_end edited to a later date by mistake moves the track record's first origin into the data the model
    was trained on. The same file registered again may change its metrics only."""
    from candlecast import cli

    _, models = sample
    data = model_bytes("1d", "seed-test-1d", "20260201T000000")
    _add_model(models, "1d", data, train_start="2019-01-01T00:00:00Z", train_end="2021-01-01T00:00:00Z")
    install = ["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]
    assert cli.main(install) == 0
    before = _state()
    _add_model(models, "1d", data, train_start="2019-01-01T00:00:00Z", train_end="2025-01-01T00:00:00Z",
               metrics={"pin5": 1.0})
    capsys.readouterr()
    assert cli.main(install) == 1
    err = capsys.readouterr().err
    assert "1d: train_end: seed-test-1d 20260201T000000 is registered with train_end 2021-01-01 00:00:00+00:00, " \
           "and the manifest says 2025-01-01 00:00:00+00:00" in err
    assert _state() == before

    _add_model(models, "1d", data, train_start="2019-01-01T00:00:00Z", train_end="2021-01-01T00:00:00Z",
               metrics={"pin5": 1.0})
    assert cli.main(install) == 0  # the same window: a release installed again, its metrics refreshed


@pytest.mark.parametrize(("bad", "line"), [
    ("no version", "1d: version: missing"),
    ("unknown kind", "1d: kind: Input should be"),
    ("a date that is none", "1d: train_end: not an ISO time"),
    ("another version in the file", "1d: file: the 1d model file holds seed-test-1d 20260101T000000 (1d), not the "
                                    "registered seed-test-1d 20260201T000000"),
    ("another name in the file", "1d: file: the 1d model file holds other-1d 20260201T000000 (1d), not the registered"),
    ("another timeframe's file", "1d: file: the 1d model file holds seed-test-1d 20260201T000000 (1h), not the "
                                 "registered"),
    ("unsigned", "1d: signature: model file is unsigned"),
])
def test_a_release_with_one_bad_model_installs_none_of_it(seed_bucket, sample, capsys, monkeypatch, bad, line):
    """Audit: install-models checked only each file's presence and sha256 before uploading. A 1d entry without a
    version (KeyError) or of an unknown kind (pydantic) failed with a traceback after 1h was uploaded and
    activated, and a file holding another version than its entry was activated with exit 0, every forecast from it
    then a 503 model_integrity. Every entry is checked (its row, its signature, then the model its file holds)
    first: a bad one is a line naming its timeframe and field, and nothing is uploaded or changed."""
    from candlecast import cli
    from candlecast.forecast import artifact

    _, models = sample
    assert cli.main(["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]) == 0
    before = _state()
    capsys.readouterr()
    _add_model(models, "1h", model_bytes("1h", "seed-test-1h", "20260201T000000"))  # the release's good model
    data = model_bytes("1d", "seed-test-1d", "20260201T000000")
    if bad == "no version":
        _add_model(models, "1d", data, version=None)
    elif bad == "unknown kind":
        _add_model(models, "1d", data, kind="weird")
    elif bad == "a date that is none":
        _add_model(models, "1d", data, train_end="last tuesday")
    elif bad == "another version in the file":
        _add_model(models, "1d", model_bytes("1d", "seed-test-1d", "20260101T000000"))
    elif bad == "another name in the file":
        _add_model(models, "1d", model_bytes("1d", "other-1d", "20260201T000000"))
    elif bad == "another timeframe's file":
        _add_model(models, "1d", model_bytes("1h", "seed-test-1d", "20260201T000000"))
    else:
        _add_model(models, "1d", data)
        (models / "1d.pkl.sig").unlink()
    loaded = []
    monkeypatch.setattr(artifact, "load", lambda payload, load=artifact.load: loaded.append(payload) or load(payload))

    assert cli.main(["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"candlecast install-models: 1 of the 2 models of {models / 'manifest.json'} refused; "
                          "nothing uploaded or registered")
    assert f"\n  {line}" in err and "\n  1h" not in err and "Traceback" not in err
    assert _state() == before  # 1h's earlier model still active; no file of the release uploaded
    if bad == "unsigned":
        assert data not in loaded  # never unpickled


def test_every_bad_model_of_a_release_is_named_at_once(seed_bucket, sample):
    from candlecast.seed import install_models

    _, models = sample
    _add_model(models, "1h", model_bytes(), version=None)
    _add_model(models, "1d", model_bytes("1d", "seed-test-1d", "20260201T000000"), kind="weird", train_start="x")
    with pytest.raises(ValueError) as raised:
        install_models(models, progress=False)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("2 of the 2 models of") and len(lines) == 3
    assert lines[1].startswith("  1h: version: missing")
    assert lines[2].startswith("  1d: train_start: not an ISO time") and "; kind: Input should be" in lines[2]
    assert _state()["keys"] == []


@pytest.mark.parametrize("taken", ["name and version", "versioned key"])
def test_another_file_under_a_registered_version_is_refused_before_any_upload(seed_bucket, sample, capsys, taken):
    """Audit: installing another file under a registered name and version wrote it over models/{tf}/{version}.pkl
    and its sha256 over the row that past predictions name. The same release again is no change; another file is
    refused up front, as is one whose versioned key is another registered model's file."""
    from candlecast import cli, storage
    from candlecast.forecast import artifact
    from tests.forecast_checks import shipped_model

    _, models = sample
    install = ["install-models", "--bucket", seed_bucket, "--models", str(models), "--quiet"]
    assert cli.main(install) == 0
    before = _state()
    assert cli.main(install) == 0 and _state() == before  # the same release again
    capsys.readouterr()

    name = "seed-test-1h" if taken == "name and version" else "other-1h"
    retrained = artifact.dump({**shipped_model("1h").payload, "name": name, "version": "20260101T000000",
                               "retrained": True})
    _add_model(models, "1h", retrained, name=name, version="20260101T000000")
    assert cli.main(install) == 1
    err = capsys.readouterr().err
    if taken == "name and version":
        assert "\n  1h: version: seed-test-1h 20260101T000000 is registered with another file" in err
    else:
        assert "\n  1h: version: models/1h/20260101T000000.pkl is the file of the registered seed-test-1h" in err
    assert _state() == before
    assert storage.get_bytes("models/1h/20260101T000000.pkl") == model_bytes()


def weekly_sample(tmp_path) -> tuple[Path, Path]:
    """data/ and models/ with the committed 1w model and the BTC and ETH weekly candles."""
    import shutil

    from candlecast.seed import DEFAULT_DATA_DIR, DEFAULT_MODELS_DIR
    from candlecast.services import model_loading

    data, models = tmp_path / "data", tmp_path / "models"
    for coin in ("BTCUSD", "ETHUSD"):
        (data / coin).mkdir(parents=True)
        shutil.copy(DEFAULT_DATA_DIR / coin / "1w.parquet", data / coin / "1w.parquet")
    rows = (DEFAULT_DATA_DIR / "symbols.csv").read_text().splitlines()
    (data / "symbols.csv").write_text("\n".join([rows[0], *(r for r in rows if r.split(",")[0] in
                                                           ("X:BTCUSD", "X:ETHUSD"))]) + "\n")
    models.mkdir()
    for name in ("1w.pkl", "1w.pkl.sig"):
        shutil.copy(DEFAULT_MODELS_DIR / name, models / name)
    manifest = json.loads((DEFAULT_MODELS_DIR / "manifest.json").read_text())
    manifest = manifest.get("models", manifest)
    (models / "manifest.json").write_text(json.dumps({"1w": manifest["1w"]}))
    model_loading.forget_models()
    return data, models


def test_a_second_seed_after_refresh_makes_no_more_past_predictions(seed_bucket, tmp_path):
    """A model's track record is built once: a second seed, after Refresh lengthened the stored candles, spread its
    past origins over the longer series and added a second set of predictions with the same model."""
    import numpy as np

    from candlecast import db, storage
    from candlecast.candles import COLUMNS, Candles
    from candlecast.seed import seed

    data, models = weekly_sample(tmp_path)
    first = seed(data, models, progress=False, track_record=True)
    assert first.past_predictions > 0
    candles = storage.read_all_candles("X:BTCUSD", "1w")
    extra = 20
    times = np.concatenate([candles.open_time, candles.open_time[-1] + 7 * 86400 * np.arange(1, extra + 1)])
    storage.write_candles("X:BTCUSD", "1w", Candles(times, *(np.concatenate([getattr(candles, column),
                                                                            np.repeat(getattr(candles, column)[-1],
                                                                                      extra)])
                                                             for column in COLUMNS[1:])))
    with db.connection() as conn:
        before = conn.execute("SELECT count(*) AS n FROM predictions").fetchone()["n"]

    second = seed(data, models, progress=False, track_record=True)
    with db.connection() as conn:
        assert conn.execute("SELECT count(*) AS n FROM predictions").fetchone()["n"] == before
    assert second.past_predictions == 0
    assert len(storage.read_all_candles("X:BTCUSD", "1w")) == len(times)


def test_a_seed_interrupted_while_building_the_track_record_is_finished_by_the_next(seed_bucket, tmp_path, capsys,
                                                                                     monkeypatch):
    """Audit: Ctrl-C during make run's first seed left 18 of 4h's 315 past forecasts, and every later start said
    "kept" over the incomplete track record."""
    from candlecast import db
    from candlecast.seed import seed
    from candlecast.services import forecasting

    data, models = weekly_sample(tmp_path)
    create_as_of, calls = forecasting.create_as_of, []

    def interrupted_after_five(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args)
        return create_as_of(*args)

    with monkeypatch.context() as patch:
        patch.setattr(forecasting, "create_as_of", interrupted_after_five)
        with pytest.raises(KeyboardInterrupt):
            seed(data, models, progress=False, track_record=True)
    capsys.readouterr()
    second = seed(data, models, progress=False, track_record=True)
    assert "an earlier seed was interrupted after 5 of its" in capsys.readouterr().out
    (plan,) = second.plans
    with db.connection() as conn:
        made = conn.execute("SELECT count(*) AS n, count(DISTINCT idempotency_key) AS keys FROM predictions "
                            "WHERE starts_with(idempotency_key, 'as-of:')").fetchone()
    assert second.past_predictions == len(plan.origins) > 0
    assert made["n"] == made["keys"] == 5 + second.past_predictions
    third = seed(data, models, progress=False, track_record=True)
    assert third.past_predictions == 0 and "track record 1w: kept:" in capsys.readouterr().out
