"""The `candlecast` command: each area registers its own subcommands."""

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

# Modules that expose register(subparsers); imported only when the command runs.
COMMAND_MODULES = (
    "candlecast.cli",
    "candlecast.seed",
    "candlecast.forecast.cli",
    "candlecast.ingest",
)


def positive_int(value: str) -> int:
    # ASCII digits only: '²' passes str.isdigit() and fails int()
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return int(value)


def positive_int_up_to(maximum: int) -> Callable[[str], int]:
    """positive_int, refusing more than `maximum`."""

    def bounded(value: str) -> int:
        number = positive_int(value)
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {value!r}")
        return number

    return bounded


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):  # NaN fails the comparison
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {value!r}")
    return number


def _migrate(args: argparse.Namespace) -> int:
    from candlecast import migrate
    from candlecast.config import database_conninfo, get_database_settings

    settings = get_database_settings()  # DATABASE_URL (or DB_SECRET_ARN), and STAGE, are all it needs
    try:
        return _migrate_action(migrate, database_conninfo(settings), settings.stage, args)
    except migrate.MigrationError as error:
        print(f"candlecast migrate: {error}", file=sys.stderr)
        return 1


def _migrate_action(migrate, conninfo: str, stage: str, args: argparse.Namespace) -> int:
    if args.status:
        print(json.dumps(migrate.status(conninfo).as_dict(), indent=2))
    elif args.rollback is not None:
        print(json.dumps({"rolled_back": migrate.rollback(conninfo, args.rollback, stage=stage)}))
    elif args.mark_applied is not None:
        print(json.dumps({"marked": migrate.mark_applied(conninfo, args.mark_applied, stage=stage)}))
    else:
        print(json.dumps({"applied": migrate.apply(conninfo, stage=stage, take_over=args.take_over)}))
    return 0


def _db_check(_args: argparse.Namespace) -> int:
    """Connect to the database and Redis and report each (the seed's test-db script)."""
    from candlecast import cache

    report = {"database": _database_check(), "cache": {"status": "up" if cache.ping() else "down"}}
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["database"]["status"] == "up" else 1


def _database_check() -> dict:
    """A direct connection, not the API's pool: a failure is reported as it is (class, SQLSTATE, host and port,
    the server's message without the password), not as the API's "try again shortly"."""
    import psycopg
    from psycopg.rows import dict_row

    from candlecast import redaction
    from candlecast.config import database_conninfo, get_database_settings
    from candlecast.repositories import stats

    conninfo = database_conninfo(get_database_settings())
    try:
        with psycopg.connect(conninfo, connect_timeout=5, row_factory=dict_row) as conn:
            return {"status": "up", **stats.get_database_stats(conn)}
    except psycopg.Error as error:
        return {"status": "down", "error": type(error).__name__, "sqlstate": error.sqlstate, **_address(conninfo),
                "message": redaction.redact(str(error).strip())}


def _cache_invalidate(_args: argparse.Namespace) -> int:
    """Every cached kind invalidated: after a restore from a backup (README, "Restoring from a backup")."""
    from candlecast import cache

    replaced = cache.invalidate_all(retry=True)
    if replaced is None:
        print("candlecast cache-invalidate: Redis did not take it (unreachable, or refusing writes and deletes); "
              "cached answers may be served until their TTLs run out (up to 1 h): run it again", file=sys.stderr)
        return 1
    print(json.dumps({"invalidated": list(cache.GLOBAL_KINDS), "candle_files": replaced - len(cache.GLOBAL_KINDS)}))
    return 0


def _retire_symbol(args: argparse.Namespace) -> int:
    from candlecast import cache
    from candlecast.services import symbols

    ticker, cache_took_it = symbols.retire(args.ticker, retired=not args.restore)
    print(json.dumps({"restored" if args.restore else "retired": ticker}))
    if not cache_took_it:
        print(f"candlecast retire-symbol: Redis did not take it; searches and top lists may show {ticker} as before "
              f"for up to {cache.SYMBOLS_STALE_SECONDS} s: run it again", file=sys.stderr)
        return 1
    return 0


def _address(conninfo: str) -> dict:
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(conninfo)
    except Exception:  # not a connection string: the error says so
        return {}
    return {"host": parts.get("host") or "localhost (socket)", "port": int(parts.get("port") or 5432)}


def register(subparsers: argparse._SubParsersAction) -> None:
    migrate = subparsers.add_parser("migrate", help="apply database migrations, one run at a time (a PostgreSQL "
                                    "advisory lock, released by the server when a run's session ends)")
    what = migrate.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="list applied and pending migrations")
    what.add_argument("--rollback", type=positive_int, metavar="N", help="roll back the last N migrations")
    what.add_argument("--mark-applied", metavar="ID", help="record the migrations up to and including ID as applied "
                      "without running them (the schema already holds them: README, \"Restoring from a backup\")")
    what.add_argument("--take-over", action="store_true", help="apply, and record the database as STAGE's although "
                      "another stage's runs migrated it (restored from that stage's backup for this one)")
    migrate.set_defaults(func=_migrate)
    check = subparsers.add_parser("db-check", help="connect to the database and Redis and report each")
    check.set_defaults(func=_db_check)
    invalidate = subparsers.add_parser("cache-invalidate", help="invalidate every cached answer (symbols, track "
                                       "records, predictions, candles): run it after restoring from a backup")
    invalidate.set_defaults(func=_cache_invalidate)
    retire = subparsers.add_parser("retire-symbol", help="stop forecasting a symbol (a delisting, a rename, bad data) "
                                   "and stop refreshing it, whatever the listing says; --restore ends it")
    retire.add_argument("ticker", help="the symbol, in any form search takes (BTC-USD, X:BTCUSD)")
    retire.add_argument("--restore", action="store_true", help="forecast and refresh it again")
    retire.set_defaults(func=_retire_symbol)


DEBUG_VARIABLE = "CANDLECAST_DEBUG"  # set (non-empty): a mapped failure shows its traceback too


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candlecast", description="candlecast operations")
    debug_help = f"show the traceback of an expected failure too (or set {DEBUG_VARIABLE}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    for command in subparsers.choices.values():  # `candlecast migrate --debug` as well as `candlecast --debug migrate`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, debug=args.debug or bool(os.environ.get(DEBUG_VARIABLE)))


def run_command(args: argparse.Namespace, *, debug: bool = False) -> int:
    """Run the parsed subcommand. An expected failure (the database, the bucket or Polygon unreachable, a file
    missing, a model refused, bad input) is one line, `candlecast <command>: <message>`, exit 1; an interrupt exits
    130; anything else is a defect and keeps its traceback. Passwords are redacted from what is printed."""
    from candlecast import redaction

    try:
        with _signals_as_interrupts():
            return args.func(args)
    except _Ended as ended:
        _say(f"candlecast {args.command}: interrupted ({signal.Signals(ended.signum).name})")
        return 128 + ended.signum
    except KeyboardInterrupt:
        _say(f"candlecast {args.command}: interrupted")
        return 130
    except Exception as error:
        from candlecast.config import ConfigurationError

        if isinstance(error, ConfigurationError):
            print(f"candlecast: {error}", file=sys.stderr)
            return 2
        if not is_expected_failure(error):
            raise
        if debug:
            print(redaction.redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
        print(f"candlecast {args.command}: {redaction.redact(describe_failure(error))}", file=sys.stderr)
        return 1


class _Ended(KeyboardInterrupt):
    """SIGTERM or SIGHUP (an SSH session dropped): ended as Ctrl-C ends a command, its clean-up run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    def end(signum: int, _frame) -> None:
        raise _Ended(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    # One ignored (`nohup` ignores SIGHUP) stays ignored: the session may drop and the command goes on.
    kept = {signum: signal.signal(signum, end) for signum in (signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)


def _say(line: str) -> None:
    with suppress(OSError):  # the terminal is gone (a dropped session)
        print(line, file=sys.stderr)


def is_expected_failure(error: Exception) -> bool:
    """A failure of the environment or the input, not of this code."""
    import botocore.exceptions
    import psycopg
    from boto3.exceptions import Boto3Error

    from candlecast.errors import CandlecastError, UnusableInput

    expected = (OSError, psycopg.Error, CandlecastError, UnusableInput, Boto3Error, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError)
    return isinstance(error, expected)


def describe_failure(error: Exception) -> str:
    from candlecast.errors import CandlecastError

    message = error.message if isinstance(error, CandlecastError) else str(error).strip()
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"  # not "[Errno 2] No such file or directory: '...'"
    kind = type(error).__name__
    return f"{message} ({kind})" if message else kind


if __name__ == "__main__":
    sys.exit(main())
