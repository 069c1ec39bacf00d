"""Lambda's side of a local invoke: each function runs in its own "containers", as on Lambda.

A container is a process of its own (infra/lambda_bootstrap.py --serve), started with the function's
environment and its folder and layers on sys.path. It imports the handler once (the cold start) and then
runs one event at a time, so its module state (the database pool, the Redis and S3 clients, loaded models)
is its own and is reused warm by the requests that follow. When every container of a function is busy,
another is started, up to `max_containers`; past that, requests wait for one to come free.

The function's reserved concurrency (ReservedConcurrentExecutions) is a hard limit, as on Lambda: an
invoke past it is throttled at once, and API Gateway answers a throttled invoke with a 500
(docs.aws.amazon.com/lambda/latest/dg/services-apigateway-errors.html). Waiting at `max_containers`
instead is local economy only: that limit does not exist on AWS, so reaching it must not fail a request.
An invoke that runs past the function's timeout is stopped with its container, as Lambda stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.sam_template import FunctionSpec

MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous response limit
INIT_TIMEOUT_S = 10.0  # Lambda's init phase limit; a slower import is retried within the invoke's timeout
DEFAULT_MAX_CONTAINERS = 4  # per function, locally
BOOTSTRAP = Path(__file__).resolve().with_name("lambda_bootstrap.py")

log = logging.getLogger("local_api")


class FunctionError(Exception):
    """The invoke did not return a result: the handler raised, timed out, or its container died."""


class HandlerError(FunctionError):
    """The handler raised (Lambda's FunctionError); its container stays warm."""


class Throttled(FunctionError):
    """The function's reserved concurrency is in use (Lambda's TooManyRequestsException)."""


class Container:
    """One warm process of one function; it serves one invoke at a time (its owner makes sure of that)."""

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str]):
        self.spec = spec
        ours, theirs = socket.socketpair()
        env = {**os.environ, **environment}
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-u", str(BOOTSTRAP), "--serve", str(theirs.fileno())],
            env=env, pass_fds=[theirs.fileno()], cwd=spec.code_dir)
        theirs.close()
        self._channel = ours
        self._lines = ours.makefile("rb")
        self.pid = self.process.pid
        started = time.perf_counter()
        try:
            self._send({"task_root": str(spec.code_dir), "layers": [str(path) for path in spec.layer_dirs],
                        "runtime": site.getsitepackages(), "handler": spec.handler,
                        "function_name": spec.logical_id, "memory_mb": spec.memory_mb, "timeout_s": spec.timeout_s})
            ready = self._receive(INIT_TIMEOUT_S + spec.timeout_s, "init")
        except BaseException:
            self.close()
            raise
        if "init_error" in ready:
            self.close()
            raise FunctionError(f"{spec.logical_id} could not start: {ready['init_error']}\n"
                                f"{ready.get('traceback', '')}")
        self.init_ms = (time.perf_counter() - started) * 1000
        log.info("%s: cold start in container %d, imported in %.0f ms (%.0f ms with the process)",
                 spec.logical_id, self.pid, ready["init_ms"], self.init_ms)

    def _send(self, message: dict) -> None:
        self._channel.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self, timeout: float, phase: str = "task") -> dict:
        self._channel.settimeout(timeout)
        try:
            line = self._lines.readline()
        except TimeoutError:
            raise FunctionError(f"{self.spec.logical_id}: {phase} timed out after {timeout:.2f} seconds") from None
        if not line:
            raise FunctionError(f"{self.spec.logical_id}: container {self.pid} exited "
                                f"(code {self.process.poll()})")
        return json.loads(line)

    def invoke(self, event: Mapping, request_id: str) -> Any:
        self._send({"event": event, "request_id": request_id})
        answer = self._receive(self.spec.timeout_s)
        if not answer["ok"]:
            raise HandlerError(f"{self.spec.logical_id}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["result"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.close()  # end of input: the container's loop ends
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)


class FunctionRuntime:
    """A function's containers: started on demand (cold starts), reused warm, one invoke each at a time."""

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str], *,
                 max_containers: int = DEFAULT_MAX_CONTAINERS):
        self.spec = spec
        self.environment = dict(environment)
        self.reserved = spec.reserved_concurrency
        self.max_containers = max(1, min(max_containers, self.reserved or max_containers))
        self._idle: list[Container] = []  # the most recently used last: it is reused first
        self._count = 0  # containers alive or starting
        self._busy = 0  # invokes in flight, cold starts included
        self._free = threading.Condition()
        self._closed = False

    @property
    def containers(self) -> int:
        return self._count

    def _acquire(self, waited: list[float] | None = None) -> Container | None:
        """An idle container, or None when the caller is to start one. The seconds spent waiting at
        `max_containers` (which Lambda would not wait) are appended to `waited`."""
        started = time.monotonic()
        try:
            return self._take()
        finally:
            if waited is not None:
                waited.append(time.monotonic() - started)

    def _take(self) -> Container | None:
        with self._free:
            if self.reserved is not None and self._busy >= self.reserved:
                raise Throttled(f"{self.spec.logical_id}: throttled, its reserved concurrency of "
                                f"{self.reserved} is in use")
            self._busy += 1
            while True:
                if self._closed:
                    self._busy -= 1
                    raise FunctionError(f"{self.spec.logical_id}: the local API is stopping")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_containers:
                    self._count += 1
                    return None
                self._free.wait()

    def _release(self, container: Container | None) -> None:
        with self._free:
            self._busy -= 1
            if container is None:
                self._count -= 1
            elif self._closed:
                self._count -= 1
                container.close()
            else:
                self._idle.append(container)
            self._free.notify()

    def _start(self) -> Container:
        try:
            return Container(self.spec, self.environment)
        except BaseException:
            self._release(None)
            raise

    def warm_up(self, count: int = 1) -> None:
        """`count` containers (at most max_containers) ready now, as Lambda's provisioned concurrency keeps them;
        a broken handler then fails here, not on a request. Started one after another: side by side, a dozen
        imports on a small machine would each take longer than Lambda lets an init run."""
        held: list[Container] = []
        try:
            for _ in range(max(1, min(count, self.max_containers))):
                held.append(self._acquire() or self._start())
        finally:
            for container in held:
                self._release(container)

    def invoke(self, event: Mapping, request_id: str, waited: list[float] | None = None) -> Any:
        container = self._acquire(waited) or self._start()
        try:
            result = container.invoke(event, request_id)
        except HandlerError:  # the handler raised: its container lives on, warm
            self._release(container)
            raise
        except BaseException:  # it timed out or died: the container goes, as on Lambda
            container.close()
            self._release(None)
            raise
        self._release(container)
        # Lambda serialises the result; a response over 6 MB fails the invoke.
        size = len(json.dumps(result))
        if size > MAX_RESPONSE_BYTES:
            raise FunctionError(f"{self.spec.logical_id} returned {size} bytes; Lambda's limit is 6 MB")
        return result

    def close(self) -> None:
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._free.notify_all()
        for container in idle:
            container.close()

