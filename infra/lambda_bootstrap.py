"""Run one function from its built artifact the way Lambda's python3.12 runtime does; stdlib only.

    python3.12 -I infra/lambda_bootstrap.py SPEC.json
    python3.12 -I -u infra/lambda_bootstrap.py --serve FD

With --serve the process is one warm container for the local API (infra/lambda_runtime.py): it reads the
SPEC as the first JSON line on the socket FD, imports the handler once and answers one line
({"init_ms"} or {"init_error"}), then runs one event per line it reads, one at a time, answering each with
{"ok", "result"} or {"ok": false, "error"}, until the socket closes. No audit hook then (a dev tree
writes bytecode).

SPEC: {"task_root", "layers": [python folders in template order], "runtime": [the folder holding what the
runtime provides: an old boto3 and botocore, the SnapStart hooks], "handler": "app.lambda_handler", "events": [...],
"function_name", "memory_mb", "timeout_s", "importtime": false}. sys.path becomes exactly task root, layers,
runtime, then the standard library (no site-packages, no script folder). An audit hook records every write
outside /tmp. Prints one JSON line: init and first-invoke milliseconds and CPU, whether the garbage collector is
on after the import, each event's result, the writes, any error, and where boto3 and botocore were (or would be)
imported from.
"""

import gc
import json
import os
import sys
import time
import traceback

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
ALLOWED_WRITE_PREFIXES = ("/tmp/", "/dev/")  # noqa: S108 (Lambda's only writable folder)
writes: list[str] = []


def _is_allowed(path) -> bool:
    if isinstance(path, int):
        return True  # an already-open descriptor
    text = os.fsdecode(path) if isinstance(path, bytes | os.PathLike) else str(path)
    return os.path.abspath(text).startswith(ALLOWED_WRITE_PREFIXES) or text == "/tmp"  # noqa: S108


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and path is not None and not _is_allowed(path):
            writes.append(f"open {path} {mode or flags}")
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.symlink", "os.link",
                   "os.chmod", "os.truncate", "os.utime", "shutil.rmtree"):
        targets = [arg for arg in args if isinstance(arg, str | bytes | os.PathLike)]
        if any(not _is_allowed(target) for target in targets):
            writes.append(f"{event} {targets}")


class LambdaContext:
    def __init__(self, spec: dict, request_id: str):
        name = spec["function_name"]
        self.function_name = name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = spec["memory_mb"]
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "2026/01/01/[$LATEST]0123456789abcdef"
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + spec["timeout_s"]

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _prepare(spec: dict) -> None:
    standard_library = [path for path in sys.path[1:] if "site-packages" not in path and "dist-packages" not in path]
    sys.path[:] = [spec["task_root"], *spec["layers"], *spec["runtime"], *standard_library]
    # -I ignores PYTHON* variables; Lambda's runtime honours them, PYTHONDONTWRITEBYTECODE included.
    sys.dont_write_bytecode = os.environ.get("PYTHONDONTWRITEBYTECODE", "") not in ("", "0")
    os.chdir(spec["task_root"])  # Lambda's working directory is /var/task


def _load_handler(spec: dict):
    import importlib

    module_name, function_name = spec["handler"].rsplit(".", 1)
    return getattr(importlib.import_module(module_name), function_name)


def _invoke(handler, event, spec: dict, request_id: str) -> dict:
    try:
        return {"ok": True, "result": handler(event, LambdaContext(spec, request_id))}
    except Exception as error:  # Lambda reports an unhandled error as a FunctionError
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


def serve(fd: int) -> int:
    import signal
    import socket

    # Ctrl-C (and a closed terminal's SIGHUP) reaches the terminal's whole process group, these containers too: the
    # local API stops them itself (it closes their socket), so they ignore it rather than print a KeyboardInterrupt
    # each (or die mid-request).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=fd)
    lines = channel.makefile("rb")

    def answer(message: dict) -> None:
        try:
            line = json.dumps(message)
        except (TypeError, ValueError) as error:  # what JSON cannot hold: Lambda's Runtime.MarshalError
            line = json.dumps({"ok": False, "error": f"Runtime.MarshalError: {error}"})
        channel.sendall(line.encode() + b"\n")

    spec = json.loads(lines.readline())
    _prepare(spec)
    started = time.perf_counter()
    try:
        handler = _load_handler(spec)
    except BaseException as error:
        answer({"init_error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]})
        return 1
    answer({"init_ms": (time.perf_counter() - started) * 1000, "pid": os.getpid()})
    for line in lines:
        request = json.loads(line)
        answer(_invoke(handler, request["event"], spec, request["request_id"]))
    return 0


SDK_MODULES = ("boto3", "botocore")


def sdk_origins() -> dict[str, dict]:
    """Where each SDK module came from: its file when the function loaded it, else the file an import would load
    (found, not imported); None when not on the path."""
    import importlib.util

    origins = {}
    for name in SDK_MODULES:
        module = sys.modules.get(name)
        try:
            origin = module.__file__ if module is not None else getattr(importlib.util.find_spec(name), "origin", None)
        except (ImportError, ValueError):
            origin = None
        origins[name] = {"file": origin, "loaded": module is not None}
    return origins


def main() -> int:
    if sys.argv[1] == "--serve":
        return serve(int(sys.argv[2]))
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    _prepare(spec)
    sys.addaudithook(_audit)
    report: dict = {"results": [], "writes": writes}
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        handler = _load_handler(spec)
        report["init_ms"] = (time.perf_counter() - started) * 1000
        report["init_cpu_ms"] = (time.process_time() - cpu_started) * 1000
        report["gc_enabled"] = gc.isenabled()  # a function may pause the collector while it loads, not after
        for index, event in enumerate(spec["events"]):
            invoked = time.perf_counter()
            report["results"].append(_invoke(handler, event, spec, f"00000000-0000-4000-8000-{index:012d}"))
            if index == 0:
                report["first_invoke_ms"] = (time.perf_counter() - invoked) * 1000
                report["cold_ms"] = (time.perf_counter() - started) * 1000
                report["cold_cpu_ms"] = (time.process_time() - cpu_started) * 1000  # all threads, no waits
                report["cold_boto3"] = "boto3" in sys.modules
    except BaseException as error:  # an import error: the function cannot start
        report["init_error"] = f"{type(error).__name__}: {error}"
        report["traceback"] = traceback.format_exc()[-3000:]
    report["sdk"] = sdk_origins()
    sys.stdout.flush()
    print("\n@@lambda-bootstrap@@" + json.dumps(report, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
