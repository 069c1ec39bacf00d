"""`candlecast`: an expected failure is one line on stderr (exit 1, no password), an interrupt exits 130, a defect
keeps its traceback."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from candlecast import cli
from candlecast.config import LOCAL_MODEL_SIGNING_KEY, get_settings

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pw-for-cli"
UNREACHABLE_DATABASE = f"postgresql://candlecast:{PASSWORD}@127.0.0.1:1/none"


@pytest.fixture
def offline_env(monkeypatch):
    """What an offline command may see: the development key, explicitly local; no database, Redis nor bucket."""
    for name in ("DATABASE_URL", "DB_SECRET_ARN", "REDIS_URL", "DATA_BUCKET", "CANDLECAST_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STAGE", "local")
    monkeypatch.setenv("MODEL_SIGNING_KEY", LOCAL_MODEL_SIGNING_KEY)
    get_settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    get_settings.cache_clear()


def test_an_unreachable_database_is_one_line_without_the_password(offline_env, capsys):
    offline_env.setenv("DATABASE_URL", UNREACHABLE_DATABASE)
    assert cli.main(["migrate", "--status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("candlecast migrate: ") and "(OperationalError)" in err
    assert "Traceback" not in err and PASSWORD not in err


def test_a_database_url_that_is_not_a_url_is_one_line(offline_env, capsys):
    offline_env.setenv("DATABASE_URL", "notaurl")
    assert cli.main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("candlecast migrate: ") and "(ProgrammingError)" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["before", "after", "variable"])
def test_debug_shows_the_traceback_of_an_expected_failure_redacted(offline_env, capsys, how):
    offline_env.setenv("DATABASE_URL", UNREACHABLE_DATABASE)
    argv = {"before": ["--debug", "migrate"], "after": ["migrate", "--debug"], "variable": ["migrate"]}[how]
    if how == "variable":
        offline_env.setenv("CANDLECAST_DEBUG", "1")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "candlecast migrate: " in err and PASSWORD not in err


@pytest.mark.parametrize("other", [["--status"], ["--rollback", "1"]])
def test_migrate_does_one_thing_at_a_time(offline_env, capsys, other):
    """`--status --mark-applied ID` listed and marked nothing: argparse refuses the pair (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", *other, "--mark-applied", "0001_symbols"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("number", ["²", "0", "-1", "1.5", "x"])
def test_a_count_that_is_no_whole_number_is_refused_by_name(offline_env, capsys, number):
    """'²' passes str.isdigit(): `--rollback ²` crashed on int() with a traceback."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--rollback", number])
    assert exited.value.code == 2
    assert f"must be a whole number of at least 1, not {number!r}" in capsys.readouterr().err


def test_a_missing_model_file_is_one_line(offline_env, capsys, tmp_path):
    missing = tmp_path / "nonexistent.pkl"
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1d", "--model", str(missing)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"candlecast backtest: {missing}: No such file or directory (FileNotFoundError)"


def test_a_model_of_another_timeframe_is_one_line(offline_env, capsys):
    argv = ["backtest", "--data", str(ROOT / "data"), "--timeframe", "1h", "--model", str(ROOT / "models" / "1d.pkl")]
    assert cli.main(argv) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "candlecast backtest: the model is for 1d, not 1h (UnusableInput)"


def test_backtest_finds_the_repository_model_from_any_directory(offline_env, capsys, tmp_path):
    offline_env.chdir(tmp_path)
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1w", "--no-peers"]) == 0
    assert json.loads(capsys.readouterr().out)["n_origins"] > 0


def test_scorecard_reads_the_repository_manifest_from_any_directory(offline_env, capsys, tmp_path):
    """The offline commands' defaults (the manifest, models/, data/, reports/, ../shared) are the checkout's, not
    the working directory's: from elsewhere, scorecard failed and train would have written models/ there."""
    offline_env.chdir(tmp_path)
    assert cli.main(["scorecard", "--summary"]) == 0
    assert capsys.readouterr().out.startswith("| tf | shipped |")


def test_a_path_under_a_file_is_one_line(offline_env, capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    assert cli.main(["scorecard", "--manifest", str(ROOT / "models" / "manifest.json"), "--readme",
                     str(tmp_path / "afile" / "README.md")]) == 1
    assert "(NotADirectoryError)" in capsys.readouterr().err


def test_an_interrupt_exits_130(offline_env, capsys):
    def interrupted(_manifest):
        raise KeyboardInterrupt

    offline_env.setattr("candlecast.forecast.cli.summary_table", interrupted)
    assert cli.main(["scorecard", "--manifest", str(ROOT / "models" / "manifest.json"), "--summary"]) == 130
    assert capsys.readouterr().err == "candlecast scorecard: interrupted\n"


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_or_hung_up_command_ends_as_an_interrupt_does(offline_env, capsys, ending):
    """Audit: a dropped SSH session (SIGHUP) killed seed with exit 129, no `interrupted` line and none of its clean-up
    (the `finally` that drops the cached candles of files already uploaded)."""
    cleaned = []

    def ended(_manifest):
        try:
            os.kill(os.getpid(), ending)
            time.sleep(5)
        finally:
            cleaned.append(True)

    offline_env.setattr("candlecast.forecast.cli.summary_table", ended)
    before = signal.signal(ending, signal.SIG_DFL)  # as a terminal session has it (a run under nohup ignores SIGHUP)
    try:
        assert cli.main(["scorecard", "--manifest", str(ROOT / "models" / "manifest.json"), "--summary"]) == (
            128 + ending)
        assert signal.getsignal(ending) is signal.SIG_DFL  # put back as it was
    finally:
        signal.signal(ending, before)
    assert capsys.readouterr().err == f"candlecast scorecard: interrupted ({ending.name})\n"
    assert cleaned == [True]


def test_a_command_run_under_nohup_goes_on_after_a_hang_up(offline_env, capsys):
    """Review: the SIGHUP handler replaced the SIG_IGN `nohup` set, so a protected command ended when the session
    dropped."""
    def hung_up(_manifest):
        os.kill(os.getpid(), signal.SIGHUP)
        return cli_summary

    cli_summary = "| tf | the summary |"
    offline_env.setattr("candlecast.forecast.cli.summary_table", hung_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert cli.main(["scorecard", "--manifest", str(ROOT / "models" / "manifest.json"), "--summary"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert capsys.readouterr().out.startswith(cli_summary)


def test_a_defect_keeps_its_traceback(offline_env):
    def broken(_manifest):
        return {}["no such key"]

    offline_env.setattr("candlecast.forecast.cli.summary_table", broken)
    with pytest.raises(KeyError):
        cli.main(["scorecard", "--manifest", str(ROOT / "models" / "manifest.json"), "--summary"])


def test_offline_commands_refuse_to_fall_back_to_the_public_key(offline_env, capsys, tmp_path):
    """No key set: train stops before it reads any data and backtest verifies nothing, each naming what to set."""
    offline_env.delenv("MODEL_SIGNING_KEY")
    assert cli.main(["train", "--timeframe", "1w", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m"),
                     "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "MODEL_SIGNING_KEY" in err and "STAGE=local" in err and not (tmp_path / "m").exists()
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1w", "--no-peers"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "MODEL_SIGNING_KEY" in captured.err


def test_offline_commands_take_the_public_key_only_with_stage_local_set(offline_env, capsys):
    offline_env.delenv("STAGE")
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1w", "--no-peers"]) == 2
    assert "public development key" in capsys.readouterr().err
    offline_env.setenv("STAGE", "local")
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1w", "--no-peers"]) == 0


def test_offline_commands_need_neither_the_database_nor_redis_nor_the_bucket(offline_env, capsys):
    assert cli.main(["backtest", "--data", str(ROOT / "data"), "--timeframe", "1w", "--no-peers"]) == 0
    err = capsys.readouterr().err
    assert "REDIS_URL" not in err and "DATA_BUCKET" not in err and "DATABASE_URL" not in err
