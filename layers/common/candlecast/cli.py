"""The `candlecast` command: each area registers its own subcommands."""

import argparse
import importlib
import json
import sys

# Modules that expose register(subparsers); imported only when the command runs.
COMMAND_MODULES = (
    "candlecast.cli",
    "candlecast.seed",
    "candlecast.forecast.cli",
    "candlecast.ingest",
)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {value!r}")
    return int(value)


def _migrate(args: argparse.Namespace) -> int:
    from candlecast import migrate
    from candlecast.config import database_conninfo, get_database_settings

    conninfo = database_conninfo(get_database_settings())  # DATABASE_URL (or DB_SECRET_ARN) is all it needs
    try:
        return _migrate_action(migrate, conninfo, args)
    except migrate.MigrationError as error:
        print(f"candlecast migrate: {error}", file=sys.stderr)
        return 1


def _migrate_action(migrate, conninfo: str, args: argparse.Namespace) -> int:
    if args.status:
        print(json.dumps(migrate.status(conninfo).as_dict(), indent=2))
    elif args.rollback is not None:
        print(json.dumps({"rolled_back": migrate.rollback(conninfo, args.rollback)}))
    else:
        print(json.dumps({"applied": migrate.apply(conninfo)}))
    return 0


def _db_check(_args: argparse.Namespace) -> int:
    """Connect to the database and Redis and report each (the seed's test-db script)."""
    from candlecast import cache, db
    from candlecast.repositories import stats

    report: dict = {}
    try:
        with db.connection() as conn:
            report["database"] = {"status": "up", **stats.get_database_stats(conn)}
    except Exception as error:
        report["database"] = {"status": "down", "error": str(error)}
    report["cache"] = {"status": "up" if cache.ping() else "down"}
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["database"]["status"] == "up" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    migrate = subparsers.add_parser("migrate", help="apply database migrations, one run at a time (a PostgreSQL "
                                    "advisory lock, released by the server when a run's session ends)")
    migrate.add_argument("--status", action="store_true", help="list applied and pending migrations")
    migrate.add_argument("--rollback", type=_positive_int, metavar="N", help="roll back the last N migrations")
    migrate.set_defaults(func=_migrate)
    check = subparsers.add_parser("db-check", help="connect to the database and Redis and report each")
    check.set_defaults(func=_db_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candlecast", description="candlecast operations")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:
        from candlecast.config import ConfigurationError

        if isinstance(error, ConfigurationError):
            print(f"candlecast: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
