"""Every function run from its built artifact, the way Lambda runs it (`make check-artifacts`).

    python -m infra.artifacts build            # the x86_64 twin of `sam build` into .local/twin/build
    python -m infra.artifacts check            # build, then run every function from it (fails on any problem)
    python -m infra.artifacts bench [--baseline REF] [--runs 5] [--no-importtime] [--functions health,symbols]
                                               # cold init from the artifact beside the dev venv

The twin is derived, never kept by hand: template.yaml with this machine's architecture in place of
arm64 and absolute code paths, built by the same SAM CLI and the same layer Makefiles (PLATFORMS set
to this machine's wheels). Each function then runs in a fresh `python3.12 -I` (infra/lambda_bootstrap.py):
sys.path = function folder, its layers' python folders in template order, then a folder with what the runtime
provides (.local/lambda-runtime: an old boto3, so a function that misses the CommonLayer's fails); code folders
read-only; an unprivileged user, or
root without capabilities where the interpreter is not reachable by one; no HOME;
PYTHONDONTWRITEBYTECODE=1; the template's environment with the deployed secrets as Secrets Manager ARNs
(moto) against the local stack, for a stage that is not "local" with a signing key of its own (the
committed models re-signed with it, as `seed --resign` does). Events: tests/events/*.json whose routeKey is
one of the function's HttpApi routes, else files named after the function's folder (`migrate_*.json`); a
CloudFormation event gets a local ResponseURL that captures the PUT. Fails on an import error, a write outside /tmp, an
event that errors, a status or what the run achieved (`achieved`: failed symbols, counts, an error's code) that
differs from the same events run from the dev tree, a failure in either run, garbage collection
left off after the import, or boto3/botocore imported (or importable) from anywhere but the function's layers.
"""

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from infra.events import EVENTS
from infra.template_checks import SAM_VENV

ROOT = Path(__file__).resolve().parent.parent
TWIN_DIR = ROOT / ".local/twin"
RUNTIME_DIR = ROOT / ".local/lambda-runtime"
BOOTSTRAP = ROOT / "infra/lambda_bootstrap.py"
SAM = SAM_VENV / "bin/sam"
MARKER = "@@lambda-bootstrap@@"
SESSION_TOKEN = "local-session-token"  # noqa: S105 (a placeholder the extension stand-in checks)
# The deployed configuration uses the secrets extension when this parameter names its layer.
LOCAL_EXTENSION_ARN = "arn:aws:lambda:us-east-1:123456789012:layer:local-secrets-extension:1"

# Functions invoked by no tests/events file (imported from the artifact only), each with why; none today.
NOT_INVOKED: dict[str, str] = {}
CHECK_STAGE = "artifacts"  # a deployed stage's name; only "local" may use the development signing key
POLYGON_KEY = "local-polygon-key"  # the fake Polygon server's key, stored as the secret
ARCH_KEYS = re.compile(r"^(\s*(?:Architectures|CompatibleArchitectures):\s*\[\s*)arm64(\s*\])", re.MULTILINE)
BUILD_ARCH = re.compile(r"^(\s*BuildArchitecture:\s*)arm64\s*$", re.MULTILINE)
CODE_PATHS = re.compile(r"^(\s*(?:CodeUri|ContentUri):\s*)([^\s#]+)", re.MULTILINE)


class ArtifactCheckFailed(RuntimeError):
    pass


# ---------------------------------------------------------------- the twin build
def machine() -> tuple[str, str]:
    """(SAM architecture, wheel platform machine) of this machine."""
    arch = platform.machine()
    return ("arm64", "aarch64") if arch in ("aarch64", "arm64") else ("x86_64", "x86_64")


def twin_template(text: str, source_root: Path) -> str:
    """template.yaml for this machine: arm64 -> this architecture, code paths absolute."""
    sam_arch, _ = machine()
    text = ARCH_KEYS.sub(lambda m: m.group(1) + sam_arch + m.group(2), text)
    text = BUILD_ARCH.sub(lambda m: m.group(1) + sam_arch, text)
    text = CODE_PATHS.sub(lambda m: m.group(1) + str((source_root / m.group(2)).resolve()), text)
    if re.search(r"^\s*(?:Architectures|CompatibleArchitectures|BuildArchitecture):.*arm64", text, re.MULTILINE):
        raise ArtifactCheckFailed("template.yaml names arm64 in a form the twin does not rewrite")
    return text


def _tree_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _writable(path: Path) -> None:
    for entry in [path, *path.rglob("*")] if path.exists() else []:
        if not entry.is_symlink():
            entry.chmod(entry.stat().st_mode | 0o200)


def _read_only(path: Path) -> None:
    for entry in [*path.rglob("*"), path]:
        if not entry.is_symlink():
            entry.chmod(entry.stat().st_mode & ~0o222)


def build_twin(source_root: Path = ROOT, target: Path = TWIN_DIR) -> Path:
    """sam build of the twin template into target/build (skipped when its inputs are unchanged)."""
    text = twin_template((source_root / "template.yaml").read_text(), source_root)
    code_dirs = sorted({Path(m.group(2)) for m in CODE_PATHS.finditer(text)})
    inputs = [*code_dirs, source_root / "migrations", source_root / "models", source_root / "layers"]
    stamp = _tree_digest([p for p in inputs if p.exists()]) + hashlib.sha256(text.encode()).hexdigest()
    build_dir, stamp_file = target / "build", target / "stamp"
    if build_dir.is_dir() and stamp_file.exists() and stamp_file.read_text() == stamp:
        print(f"twin build up to date: {build_dir}")
        return build_dir
    _writable(target)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "template.yaml").write_text(text)
    _, wheel_machine = machine()
    platforms = " ".join(f"--platform {tag}_{wheel_machine}" for tag in ("manylinux_2_28", "manylinux_2_17",
                                                                           "manylinux2014"))
    python = python312()
    env = {**os.environ, "PATH": f"{Path(python).parent}:{os.environ.get('PATH', '')}", "SAM_CLI_TELEMETRY": "0",
           "AWS_DEFAULT_REGION": "us-east-1", "PLATFORMS": platforms, "PYTHON": python}
    command = [str(SAM), "build", "--template-file", str(target / "template.yaml"), "--build-dir", str(build_dir),
               "--parallel", "--no-cached"]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, env=env, cwd=target, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArtifactCheckFailed(f"the twin sam build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    _read_only(build_dir)
    stamp_file.write_text(stamp)
    return build_dir


def python312() -> str:
    """An interpreter like Lambda's: python3.12 on PATH (the Makefile puts pyenv's first), else pyenv's."""
    import glob

    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which("python3.12"), *sorted(glob.glob(f"{pyenv_root}/versions/3.12*/bin/python3.12"))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return str(Path(candidate).resolve())
    raise ArtifactCheckFailed("python3.12 not found (pyenv install 3.12)")


def runtime_dir() -> Path:
    if not (RUNTIME_DIR / "boto3").is_dir():
        raise ArtifactCheckFailed(f"{RUNTIME_DIR.relative_to(ROOT)} is missing: run `make check-artifacts`")
    return RUNTIME_DIR


# ---------------------------------------------------------------- the template's functions
@dataclass
class Function:
    logical_id: str
    folder: str  # CodeUri's last part: functions/<folder>
    handler: str
    layers: list[str]
    memory_mb: int
    timeout_s: int
    environment: dict[str, Any]
    routes: set[str] = field(default_factory=set)  # "GET /health"


def template_functions(template: dict) -> list[Function]:
    from infra.template_checks import function_layers

    globals_ = template.get("Globals", {}).get("Function", {})
    layers = function_layers(template)
    functions = []
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        props = resource["Properties"]
        environment = {**globals_.get("Environment", {}).get("Variables", {}),
                       **props.get("Environment", {}).get("Variables", {})}
        routes = {f"{event['Properties']['Method'].upper()} {event['Properties']['Path']}"
                  for event in props.get("Events", {}).values() if event["Type"] == "HttpApi"}
        functions.append(Function(
            logical_id=logical_id, folder=Path(props["CodeUri"]).name,
            handler=props.get("Handler", globals_.get("Handler")), layers=layers[logical_id],
            memory_mb=int(props.get("MemorySize", globals_.get("MemorySize", 128))),
            timeout_s=int(props.get("Timeout", globals_.get("Timeout", 3))),
            environment=environment, routes=routes,
        ))
    return functions


def run_order(functions: list[Function]) -> list[Function]:
    """Migrate first (the artifact migrates the empty database); the refresh, which rewrites the symbol
    table from Polygon, last."""
    return sorted(functions, key=lambda f: (f.folder != "migrate", f.folder == "refresh"))


def invoke_order(function: Function) -> tuple[str, str]:
    """Which run goes first on the shared state. The artifact's, where the first run does the work and the second
    finds it done: Migrate's on the empty database, and the refresh's, which writes the candles (a second run finds
    them stored and writes none, so an artifact that cannot write would never be seen failing to)."""
    return ("artifact", "dev") if function.folder in ("migrate", "refresh") else ("dev", "artifact")


def function_events(function: Function) -> list[tuple[str, dict]]:
    """(file name, event) for the function: HTTP events by route, others by the folder's name; CFN first."""
    found = []
    for path in sorted(EVENTS.glob("*.json")):
        event = json.loads(path.read_text())
        route = event.get("routeKey") if isinstance(event, dict) else None
        if (route and route in function.routes) or (not route and path.stem.startswith(function.folder)):
            found.append((path.name, event))
    return sorted(found, key=lambda item: "RequestType" not in item[1])


class Resolver:
    """Evaluates the intrinsics a template's environment uses: Ref, Fn::If, Fn::Sub, conditions."""

    def __init__(self, template: dict, parameters: dict[str, str], resources: dict[str, str]):
        self.template = template
        self.values = {name: str(spec.get("Default", "")) for name, spec in template.get("Parameters", {}).items()}
        self.values.update(parameters)
        self.values.update(resources)
        self.values.update({"AWS::Region": "us-east-1", "AWS::AccountId": "123456789012", "AWS::Partition": "aws",
                            "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": "candlecast-local"})

    def condition(self, name: str) -> bool:
        return bool(self.value(self.template["Conditions"][name]))

    def value(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.value(item) for item in node]
        if not isinstance(node, dict) or len(node) != 1:
            return node
        (key, argument), = node.items()
        if key == "Ref":
            return self.values.get(argument, f"local-{argument}")
        if key == "Fn::If":
            name, when_true, when_false = argument
            return self.value(when_true if self.condition(name) else when_false)
        if key == "Fn::Equals":
            left, right = (self.value(item) for item in argument)
            return str(left) == str(right)
        if key == "Fn::Not":
            return not self.value(argument[0])
        if key == "Fn::And":
            return all(self.value(item) for item in argument)
        if key == "Fn::Or":
            return any(self.value(item) for item in argument)
        if key == "Condition":
            return self.condition(argument)
        if key == "Fn::Sub":
            text, variables = (argument, {}) if isinstance(argument, str) else argument
            scope = {**self.values, **{name: self.value(item) for name, item in variables.items()}}
            return re.sub(r"\$\{([^}]+)\}", lambda m: str(scope.get(m.group(1), f"local-{m.group(1)}")), text)
        if key == "Fn::GetAtt":
            return f"local-{argument if isinstance(argument, str) else '.'.join(argument)}"
        return node


# ---------------------------------------------------------------- the deployed configuration, locally
class ResponseCapture:
    """A local stand-in for CloudFormation's pre-signed ResponseURL: keeps every PUT (path, headers, body) and
    answers the first `failures` of them with a 500."""

    def __init__(self, failures: int = 0):
        self.requests: list[dict] = []
        self.failures = failures
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                capture.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status = 500 if capture.failures > 0 else 200
                capture.failures -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stack-response?X-Amz-Signature=local"

    @property
    def captured(self) -> list[dict]:
        """The PUT bodies, as JSON."""
        return [json.loads(request["body"]) for request in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SecretsExtension:
    """A local stand-in for the AWS Parameters and Secrets Lambda Extension's HTTP endpoint
    (GET /secretsmanager/get?secretId=..., X-Aws-Parameters-Secrets-Token = the session token), answering
    from moto's Secrets Manager. Counts what it served, so the check shows the extension path was taken."""

    def __init__(self, endpoint_url: str, session_token: str):
        import boto3

        client = boto3.client("secretsmanager", endpoint_url=endpoint_url, region_name="us-east-1")
        served = self.served = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit

                url = urlsplit(self.path)
                if self.headers.get("X-Aws-Parameters-Secrets-Token") != session_token:
                    return self._answer(403, {"error": "missing or wrong X-Aws-Parameters-Secrets-Token"})
                if url.path != "/secretsmanager/get":
                    return self._answer(404, {"error": url.path})
                secret = client.get_secret_value(SecretId=parse_qs(url.query)["secretId"][0])
                served.append(secret["ARN"])
                return self._answer(200, {key: secret[key] for key in ("ARN", "Name", "SecretString", "VersionId")})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpToUnixSocket:
    """127.0.0.1:port forwarded to the embedded PostgreSQL's unix socket: the artifact reaches the database
    over TCP, as a Lambda reaches RDS, and needs no access to the server's private socket folder."""

    def __init__(self, socket_path: str):
        import socket

        self.socket_path = socket_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.socket_path)
            except OSError:  # PostgreSQL stopped (no socket file) or refusing: this client sees its connection
                # closed, as it would from a stopped server, and the next one is tried again when it comes
                upstream.close()
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(1)

    def close(self) -> None:
        self.listener.close()


@dataclass
class Deployment:
    """The local stack dressed as the deployed configuration: secrets in moto's Secrets Manager."""

    stack: Any
    secret_arns: dict[str, str]
    response: ResponseCapture
    database_proxy: TcpToUnixSocket | None = None
    extension: SecretsExtension | None = None
    polygon: Any = None  # a fake Polygon server, for the refresh
    stage: str = "local"
    signing_key: str = ""

    @property
    def polygon_url(self) -> str | None:
        return self.polygon.url if self.polygon is not None else None

    @classmethod
    def create(cls, stack, stage: str = "local", signing_key: str | None = None) -> "Deployment":
        import boto3
        from psycopg.conninfo import conninfo_to_dict

        from candlecast.config import LOCAL_MODEL_SIGNING_KEY

        signing_key = signing_key or LOCAL_MODEL_SIGNING_KEY
        client = boto3.client("secretsmanager", endpoint_url=stack.s3_endpoint_url, region_name="us-east-1")
        db = conninfo_to_dict(stack.database_url)
        proxy = None
        if str(db.get("host", "")).startswith("/"):
            proxy = TcpToUnixSocket(f"{db['host']}/.s.PGSQL.{db.get('port') or 5432}")
            db.update(host="127.0.0.1", port=proxy.port)
        secrets = {
            "DbSecretArn": json.dumps({"host": db.get("host", "127.0.0.1"), "port": int(db.get("port") or 5432),
                                       "dbname": db.get("dbname"), "username": db.get("user"),
                                       "password": db.get("password") or "", "sslmode": "disable"}),
            "ModelSigningKeySecretArn": signing_key,
            "PolygonApiKeySecretArn": POLYGON_KEY,
        }
        arns = {}
        for name, value in secrets.items():
            secret_name = f"candlecast-artifacts-{name}-{os.getpid()}"
            with contextlib.suppress(client.exceptions.ResourceExistsException):
                client.create_secret(Name=secret_name, SecretString=value)
            arns[name] = client.describe_secret(SecretId=secret_name)["ARN"]
        extension = SecretsExtension(stack.s3_endpoint_url, SESSION_TOKEN)
        return cls(stack=stack, secret_arns=arns, response=ResponseCapture(), database_proxy=proxy,
                   extension=extension, polygon=_fake_polygon(), stage=stage, signing_key=signing_key)

    def artifact_environment(self, template: dict, function: Function, task_root: Path) -> dict[str, str]:
        redis = re.match(r"redis://([^/]+)/", self.stack.redis_url)
        parameters = {**self.secret_arns, "RedisEndpoint": redis.group(1), "RedisTls": "false", "Stage": self.stage,
                      "SecretsExtensionLayerArn": LOCAL_EXTENSION_ARN}
        resolver = Resolver(template, parameters, {"DataBucket": self.stack.bucket})
        env = {name: str(resolver.value(value)) for name, value in function.environment.items()}
        env = {name: value.replace("/var/task", str(task_root)) for name, value in env.items()}
        env["S3_ENDPOINT_URL"] = self.stack.s3_endpoint_url  # declared "" in the template for sam local
        if self.polygon_url:
            env["POLYGON_BASE_URL"] = self.polygon_url
        if env.get("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT") and self.extension is not None:
            env["PARAMETERS_SECRETS_EXTENSION_HTTP_PORT"] = str(self.extension.port)  # its stand-in, on a free port
        return {
            **env,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.stack.s3_endpoint_url,  # moto serves both
            "AWS_ENDPOINT_URL_LAMBDA": self.stack.s3_endpoint_url,  # moto too: Score, started by the refresh
            "AWS_LAMBDA_FUNCTION_NAME": f"candlecast-local-{function.folder}",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": SESSION_TOKEN,
            "LAMBDA_TASK_ROOT": str(task_root),
            "LANG": "en_US.UTF-8", "TZ": ":UTC", "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def dev_environment(self) -> dict[str, str]:
        polygon = {"POLYGON_BASE_URL": self.polygon_url, "POLYGON_API_KEY": POLYGON_KEY} if self.polygon_url else {}
        return {**self.stack.environment(), **polygon, "STAGE": self.stage, "MODEL_SIGNING_KEY": self.signing_key,
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "POWERTOOLS_SERVICE_NAME": "candlecast", "HOME": os.environ.get("HOME", "/tmp")}  # noqa: S108

    def prepared_events(self, events: list[tuple[str, dict]]) -> list[dict]:
        prepared = []
        for _, event in events:
            if isinstance(event, dict) and "ResponseURL" in event:
                event = {**event, "ResponseURL": self.response.url}
            prepared.append(event)
        return prepared

    def close(self) -> None:
        self.response.close()
        for server in (self.database_proxy, self.extension):
            if server is not None:
                server.close()
        if self.polygon is not None:
            self.polygon.__exit__(None, None, None)


# ---------------------------------------------------------------- running one function
def _unprivileged_prefix(python: str) -> tuple[list[str], str]:
    """How to drop privileges: nobody when it can run the interpreter, else root without capabilities."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return [], "the current user" if os.geteuid() != 0 else "root (setpriv missing)"
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--no-new-privs"]
    probe = subprocess.run([*nobody, python, "-I", "-c", "import os; os.stat(" + repr(str(TWIN_DIR)) + ")"],
                           capture_output=True, env={"PATH": "/usr/bin:/bin"})
    if probe.returncode == 0:
        return nobody, "nobody"
    return (["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"],
            "root without capabilities (the interpreter is not readable by nobody)")


def run_bootstrap(python: str, spec: dict, env: dict[str, str], prefix: list[str] = (),
                  flags: list[str] = ("-I",)) -> tuple[dict, str]:
    """One fresh interpreter running the spec's events; returns (report, stderr)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="lambda-spec-", delete=False) as handle:
        json.dump(spec, handle)
    os.chmod(handle.name, 0o644)
    try:
        result = subprocess.run([*prefix, python, *flags, str(BOOTSTRAP), handle.name], env=env,
                                capture_output=True, text=True, timeout=spec["timeout_s"] + 60, cwd="/tmp")  # noqa: S108
    finally:
        os.unlink(handle.name)
    if MARKER not in result.stdout:
        raise ArtifactCheckFailed(f"{spec['function_name']} crashed (exit {result.returncode}):\n"
                                  f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.rsplit(MARKER, 1)[1]), result.stderr


def sdk_from_layers(report: dict, layers: list[str]) -> tuple[str, list[str]]:
    """(where botocore came from, for the table; problems): boto3 and botocore must load from one of the function's
    layer folders, never the runtime's, whose SDK is older than the code needs (PutObject's IfMatch) and changes
    when AWS updates it. A function that did not import them is judged by where an import would find them."""
    from infra.lambda_bootstrap import SDK_MODULES

    shown, problems = "not reported", []
    for name in SDK_MODULES:
        origin = (report.get("sdk") or {}).get(name) or {"file": None, "loaded": False}
        found = origin["file"]
        layer = next((Path(folder) for folder in layers if found and Path(found).is_relative_to(folder)), None)
        if layer is None:
            problems.append(f"{name} {'loaded' if origin['loaded'] else 'found'} at {found}, not in the function's "
                            f"layers: it would run on the runtime's SDK")
        if name == "botocore":
            shown = (layer.parent.name if layer else f"NOT A LAYER: {found}") + (" (loaded)" if origin["loaded"]
                                                                                  else "")
    return shown, problems


def artifact_spec(build_dir: Path, function: Function, events: list[dict]) -> dict:
    return {"task_root": str(build_dir / function.logical_id),
            "layers": [str(build_dir / layer / "python") for layer in function.layers],
            "runtime": [str(runtime_dir())], "handler": function.handler, "events": events,
            "function_name": function.folder, "memory_mb": function.memory_mb, "timeout_s": function.timeout_s}


def dev_spec(source_root: Path, function: Function, events: list[dict]) -> dict:
    import site

    return {"task_root": str(source_root / "functions" / function.folder),
            "layers": [str(source_root / "layers/common"), str(source_root)],
            "runtime": site.getsitepackages(), "handler": function.handler, "events": events,
            "function_name": function.folder, "memory_mb": function.memory_mb, "timeout_s": function.timeout_s}


def outcome(result: dict, deployment: Deployment, captured_before: int) -> str:
    """A comparable status: the HTTP status, the CloudFormation answer, or ok/error of a direct invoke."""
    if not result["ok"]:
        return "error: " + result["error"].split(":", 1)[0]
    value = result["result"]
    if isinstance(value, dict) and "statusCode" in value:
        return str(value["statusCode"])
    if isinstance(value, dict) and "Status" in value and "PhysicalResourceId" in value:
        answers = deployment.response.captured[captured_before:]
        return "cfn " + (answers[-1]["Status"] if answers else "no answer")
    return "ok"


def achieved(result: dict) -> dict:
    """What a run achieved beyond its status, in fields two runs of one event share: an HTTP answer's error code; the
    refresh's failed symbols (failed or unrecorded, as its metrics count them) and symbol counts; score's and
    retention's counts. Never timings, ids, timestamps or messages, nor what depends on which run came first (the
    refresh's files_written and candles_added: the second run finds the first one's candles)."""
    value = result.get("result") if result.get("ok") else None
    if not isinstance(value, dict):
        return {}
    if "statusCode" in value:
        try:
            body = json.loads(value.get("body") or "null")
        except (TypeError, ValueError):
            return {}
        error = body.get("error") if isinstance(body, dict) else None
        return {"code": error.get("code")} if isinstance(error, dict) else {}
    if "symbols_done" in value:  # the refresh (ingest.IngestSummary)
        return {"failed": sorted({*value.get("failed", []), *value.get("unrecorded", [])}),
                **{key: value.get(key) for key in ("symbols_done", "symbols_upserted", "symbols_inactivated")}}
    if "scored" in value:  # the score run (scoring.ScoreReport): its failed entries name prediction ids, so a count
        return {"failed": len(value.get("failed", [])), **{key: value.get(key) for key in ("predictions", "scored",
                                                                                             "skipped")}}
    if "deleted" in value:  # retention
        return {key: value.get(key) for key in ("enabled", "examined", "deleted")}
    return {}


def result_problems(label: str, dev: dict, artifact: dict) -> list[str]:
    """The artifact's run achieved something else than the dev tree's, or either reports failures: no event here
    means one (the fake Polygon server injects no faults; an HTTP event's intended error is its code, compared)."""
    dev_achieved, artifact_achieved = achieved(dev), achieved(artifact)
    problems = []
    if artifact_achieved != dev_achieved:
        problems.append(f"{label}: artifact achieved {artifact_achieved} != dev {dev_achieved}")
    for kind, done in (("dev", dev_achieved), ("artifact", artifact_achieved)):
        if done.get("failed"):
            problems.append(f"{label}: the {kind} run failed {done['failed']}")
    return problems


# ---------------------------------------------------------------- what the layers ship
OFFLINE_LIBRARIES = {"lightgbm", "matplotlib", "arch", "pandas", "scipy", "sklearn"}  # training and reports only


def offline_imports(build_dir: Path) -> list[str]:
    """Shipped candlecast modules that import a training-only library (they belong in the layer's OFFLINE_ONLY)."""
    import ast

    found = []
    for path in sorted(build_dir.glob("*/python/candlecast/**/*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add((node.module or "").split(".")[0])
        if hits := sorted(imported & OFFLINE_LIBRARIES):
            found.append(f"{path.relative_to(build_dir)} imports {', '.join(hits)}")
    return found


# Run by the runtime's Python: bytecode is read by the version that wrote it.
_BYTECODE_PATHS = """
import marshal, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/python/**/*.pyc")):
    name = marshal.loads(path.read_bytes()[16:]).co_filename
    if not name.startswith("/opt/python/"):
        print(f"{path.relative_to(sys.argv[1])}: {name}")
"""


def build_paths_in_bytecode(build_dir: Path, python: str) -> list[str]:
    """Layer bytecode whose source path is not under /opt/python, where Lambda mounts layers: it names the build
    folder, so the layer's bytes differ with the checkout's path (`COMPILE` in layers/platforms.mk)."""
    result = subprocess.run([python, "-I", "-c", _BYTECODE_PATHS, str(build_dir)], capture_output=True, text=True,
                            check=True)
    return result.stdout.splitlines()


def layer_report(build_dir: Path) -> None:
    from infra.template_checks import directory_size

    for layer in sorted(p for p in build_dir.iterdir() if p.is_dir() and (p / "python").is_dir()):
        py = sum(1 for _ in layer.rglob("*.py"))
        pyc = sum(1 for _ in layer.rglob("*.pyc"))
        print(f"  {layer.name:<16} {directory_size(layer) / 1024 / 1024:6.1f} MB unzipped, {py} .py, {pyc} .pyc")


# ---------------------------------------------------------------- the check
def load_template(path: Path) -> dict:
    from infra.template_checks import load_template as load

    return load(path)


def reset_state(stack) -> None:
    """Forget predictions and their cache entries; symbols, models and cached candles stay (a warm world)."""
    import psycopg

    from candlecast import cache

    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('predictions')").fetchone()[0]:
            conn.execute("DELETE FROM predictions")
    cache.delete_pattern(cache.keys.all_prediction_keys())


def check(build_dir: Path) -> int:
    from infra.local_stack import started_stack

    template = load_template(ROOT / "template.yaml")
    functions = template_functions(template)
    python = python312()
    prefix, who = _unprivileged_prefix(python)
    problems: list[str] = []
    # A deployed stage's rules: not "local", so the development key is refused, and a key of its own that the
    # committed models are re-signed with (`seed --resign`), as README's Data and models has an operator do.
    stage_key = secrets.token_hex(16)
    with (started_stack("candlecast-artifacts", STAGE=CHECK_STAGE, MODEL_SIGNING_KEY=stage_key) as stack,
          contextlib.closing(Deployment.create(stack, CHECK_STAGE, stage_key)) as deployment):
        print("layers as built for this machine:")
        layer_report(build_dir)
        problems.extend(f"offline-only code in a layer: {hit}" for hit in offline_imports(build_dir))
        if found := build_paths_in_bytecode(build_dir, python):
            problems.append(f"{len(found)} layer bytecode files name the build folder, e.g. {found[0]}")
        print(f"\nrunning {len(functions)} functions from {build_dir.relative_to(ROOT)} as {who}, "
              f"python3.12 -I, no HOME, secrets by ARN (moto Secrets Manager)\n")
        print(f"  {'function':<28}{'event':<28}{'dev':>14}{'artifact':>14}  cold ms  boto3 on cold path  "
              f"botocore from")
        ordered = run_order(functions)
        seeded = False
        for function in ordered:
            events = function_events(function)
            if not events and function.logical_id not in NOT_INVOKED:
                problems.append(f"{function.logical_id}: no tests/events file matches its routes or folder "
                                f"name; add one (or a reason to NOT_INVOKED in infra/artifacts.py)")
            if function.folder != "migrate" and not seeded:
                from candlecast import seed
                from candlecast.config import get_settings

                get_settings.cache_clear()
                seed.seed(progress=False, resign=True)
                seeded = True
            prepared = deployment.prepared_events(events)
            task_root = build_dir / function.logical_id
            if not task_root.is_dir():
                problems.append(f"{function.logical_id}: not in the build output")
                continue
            runs = {}
            order = invoke_order(function)
            for kind in order:
                reset_state(stack) if seeded else None
                captured_before = len(deployment.response.captured)
                if kind == "artifact":
                    report, stderr = run_bootstrap(python, artifact_spec(build_dir, function, prepared),
                                                   deployment.artifact_environment(template, function, task_root),
                                                   prefix)
                else:
                    report, stderr = run_bootstrap(sys.executable, dev_spec(ROOT, function, prepared),
                                                   deployment.dev_environment(), flags=[])
                statuses = []
                for result in report["results"]:
                    statuses.append(outcome(result, deployment, captured_before))
                    captured_before = len(deployment.response.captured)
                runs[kind] = (report, statuses, stderr)
            artifact, dev = runs["artifact"][0], runs["dev"][0]
            if "init_error" in artifact:
                problems.append(f"{function.logical_id}: does not import from the artifact: {artifact['init_error']}"
                                f"\n{artifact.get('traceback', '')}")
            if artifact.get("gc_enabled") is False:
                problems.append(f"{function.logical_id}: garbage collection is still off once the function is "
                                f"loaded (its app.py calls candlecast.startup.begin() without done())")
            if artifact["writes"]:
                problems.append(f"{function.logical_id}: writes outside /tmp: {artifact['writes'][:5]}")
            sdk_shown, sdk_problems = sdk_from_layers(artifact, artifact_spec(build_dir, function, [])["layers"])
            problems.extend(f"{function.logical_id}: {problem}" for problem in sdk_problems)
            if not events:
                print(f"  {function.logical_id:<28}{'(import only)':<28}{'':>14}{'imported':>14}  "
                      f"{artifact.get('init_ms', 0):.0f}   {NOT_INVOKED.get(function.logical_id, '')[:60]}")
            for index, (name, _) in enumerate(events):
                dev_status = runs["dev"][1][index] if index < len(runs["dev"][1]) else "none"
                artifact_status = runs["artifact"][1][index] if index < len(runs["artifact"][1]) else "none"
                cold = (f"{artifact['cold_ms']:>7.0f}  {'yes' if artifact['cold_boto3'] else 'no':<18}  {sdk_shown}"
                        if index == 0 and "cold_ms" in artifact else "")
                print(f"  {function.logical_id:<28}{name:<28}{dev_status:>14}{artifact_status:>14}  {cold}")
                if artifact_status != dev_status:
                    detail = artifact["results"][index] if index < len(artifact["results"]) else {}
                    problems.append(f"{function.logical_id} {name}: artifact {artifact_status} != dev {dev_status}\n"
                                    f"{json.dumps(detail, default=str)[:2000]}\n{runs['artifact'][2][-2000:]}")
                if index < len(artifact["results"]) and index < len(dev["results"]):
                    problems.extend(result_problems(f"{function.logical_id} {name}", dev["results"][index],
                                                    artifact["results"][index]))
                if artifact_status.startswith(("error", "cfn FAILED", "cfn no")):
                    problems.append(f"{function.logical_id} {name}: {artifact_status}")
            if "dev" in runs and "init_error" in dev:
                problems.append(f"{function.logical_id}: the dev tree does not import: {dev['init_error']}")
            if function.folder == "migrate":
                problems.extend(_migrated_everything(stack))
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    served = len(deployment.extension.served) if deployment.extension else 0
    print(f"\nsecrets served by the extension stand-in: {served}")
    print(f"check-artifacts: {len(functions)} functions, {len(problems)} problem(s)")
    return 1 if problems else 0


def _fake_polygon():
    """tests/fake_polygon.py's server with three symbols and 70 days of bars, for the refresh function."""
    import time

    sys.path.insert(0, str(ROOT))
    from tests.fake_polygon import FakePolygon, make_market

    return FakePolygon(make_market(3, now=int(time.time()), history_days=70), api_key=POLYGON_KEY).__enter__()


def _migrated_everything(stack) -> list[str]:
    """The artifact's migrations reached the empty database: every migration in migrations/ is applied."""
    from candlecast import migrate

    state = migrate.status(stack.database_url, ROOT / "migrations")
    if state.pending or not state.applied:
        return [f"after the artifact's Migrate, applied {state.applied}, pending {state.pending}"]
    return []


# ---------------------------------------------------------------- cold starts for `make bench`
@dataclass
class Variant:
    """One way of running the functions: a twin build (this tree or a baseline) or the dev tree."""

    label: str
    source_root: Path
    build_dir: Path | None  # None: the dev tree
    functions: list[Function]
    template: dict


def baseline_variant(ref: str) -> Variant:
    """`git archive REF` unpacked under .local/baseline, and its own twin build, derived from its template."""
    target = ROOT / ".local/baseline" / re.sub(r"[^A-Za-z0-9._-]", "_", ref)
    source = target / "src"
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    if not (source / ".commit").exists() or (source / ".commit").read_text() != commit:
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        (source / ".commit").write_text(commit)
    template = load_template(source / "template.yaml")
    return Variant(f"artifact {ref} ({commit[:7]})", source, build_twin(source, target / "twin"),
                   template_functions(template), template)


def _spec_and_env(variant: Variant, function: Function, deployment: Deployment, events: list[dict]):
    if variant.build_dir is None:
        return sys.executable, dev_spec(variant.source_root, function, events), deployment.dev_environment(), []
    return (python312(), artifact_spec(variant.build_dir, function, events),
            deployment.artifact_environment(variant.template, function, variant.build_dir / function.logical_id),
            ["-I"])


def cold_start_table(stack, runs: int = 5, baseline: str | None = None, importtime: bool = True,
                     only: set[str] | None = None) -> None:
    """Import + first invoke in fresh processes, median of `runs`, for every variant side by side; `only`: the
    function folders to measure (all when None)."""
    template = load_template(ROOT / "template.yaml")
    functions = [f for f in template_functions(template) if only is None or f.folder in only]
    variants = [] if not baseline else [baseline_variant(baseline)]
    variants.append(Variant("artifact (this tree)", ROOT, build_twin(), functions, template))
    variants.append(Variant("dev venv", ROOT, None, functions, template))
    prefix, who = _unprivileged_prefix(python312())
    deployment = Deployment.create(stack)
    try:
        print(f"cold init: import + first invoke, fresh process, median of {runs} (artifact runs as {who}); "
              f"cpu: the process's CPU time over the same span, less sensitive to other load (waits not in it), "
              f"in brackets the first invoke's part of it: Lambda runs init on a full vCPU, an invoke on the "
              f"memory's share (1,769 MB = 1 vCPU); load average {os.getloadavg()[0]:.2f}")
        header = "".join(f"{variant.label[:30]:>32}" for variant in variants)
        print(f"  {'function (first event)':<46}{header}   target")
        for function in run_order(functions):
            events = _shared_first_event(function, variants)
            if not events:
                continue
            samples: dict[str, list[float]] = {variant.label: [] for variant in variants}
            cpu: dict[str, list[float]] = {variant.label: [] for variant in variants}
            invoke_cpu: dict[str, list[float]] = {variant.label: [] for variant in variants}
            statuses: dict[str, str] = {}
            for _ in range(runs):
                for variant in variants:  # interleaved, so the machine's noise falls on every variant alike
                    same = next((f for f in variant.functions if f.logical_id == function.logical_id), None)
                    if same is None:
                        continue
                    reset_state(stack)
                    python, spec, env, flags = _spec_and_env(variant, same, deployment,
                                                             deployment.prepared_events(events))
                    report, stderr = run_bootstrap(python, spec, env, prefix if variant.build_dir else [], flags)
                    if "cold_ms" not in report:
                        raise ArtifactCheckFailed(f"{variant.label} {function.logical_id}: "
                                                  f"{report.get('init_error')}\n{stderr[-2000:]}")
                    samples[variant.label].append(report["cold_ms"])
                    cpu[variant.label].append(report["cold_cpu_ms"])
                    invoke_cpu[variant.label].append(report["cold_cpu_ms"] - report["init_cpu_ms"])
                    statuses[variant.label] = outcome(report["results"][0], deployment, 0)
            cells = "".join(
                f"{statistics.median(samples[v.label]):>10.0f} ms cpu {statistics.median(cpu[v.label]):>4.0f} "
                f"({statistics.median(invoke_cpu[v.label]):>3.0f}) {statuses.get(v.label, '-')[:3]:>3}"
                if samples[v.label] else f"{'-':>32}" for v in variants)
            name = f"{function.logical_id} ({events[0][0]})"
            print(f"  {name:<46}{cells}   {COLD_TARGETS.get(function.folder, '')}")
        print(f"  load average {os.getloadavg()[0]:.2f} at the end")
        if importtime:
            importtime_account(variants[-2], functions, deployment, prefix)
    finally:
        deployment.close()


def _shared_first_event(function: Function, variants: list[Variant]) -> list[tuple[str, dict]]:
    """The function's first event that every variant serving the function routes (a baseline may lack newer
    routes), so each column measures the same request."""
    for name, event in function_events(function):
        route = event.get("routeKey")
        same = [next((f for f in v.functions if f.logical_id == function.logical_id), None) for v in variants]
        if all(f is None or not route or route in f.routes for f in same):
            return [(name, event)]
    return []


COLD_TARGETS = {"health": "<= 300 ms", "symbols": "<= 300 ms", "predictions_get": "<= 300 ms",
                "predictions_create": "<= 600 ms incl. model load", "migrate": "<= 300 ms"}


def importtime_account(variant: Variant, functions: list[Function], deployment: Deployment, prefix: list[str],
                       top: int = 8) -> None:
    """Where a cold start goes: -X importtime self time summed by top-level package, then the first invoke."""
    print(f"\nwhere the cold start goes ({variant.label}; python -X importtime, self time by top-level package)")
    for function in functions:
        events = function_events(function)[:1]
        python, spec, env, flags = _spec_and_env(variant, function, deployment, deployment.prepared_events(events))
        reset_state(deployment.stack)
        report, stderr = run_bootstrap(python, spec, env, prefix, [*flags, "-X", "importtime"])
        by_package: dict[str, int] = {}
        for line in stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S+)", line)
            if match:
                package = match.group(2).split(".")[0]
                by_package[package] = by_package.get(package, 0) + int(match.group(1))
        ranked = sorted(by_package.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{name} {us / 1000:.0f}" for name, us in ranked[:top])
        rest = sum(us for _, us in ranked[top:]) / 1000
        invoke = f"first invoke {report.get('first_invoke_ms', 0):.0f} ms" if events else "not invoked"
        print(f"  {function.logical_id:<26} imports {sum(by_package.values()) / 1000:.0f} ms: {shown}, "
              f"other {rest:.0f}; {invoke}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check", "bench"])
    parser.add_argument("--baseline", help="a git ref whose own twin build is measured beside this tree's")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-importtime", dest="importtime", action="store_false",
                        help="skip the -X importtime breakdown")
    parser.add_argument("--functions", help="comma-separated function folders to measure (default: all)")
    args = parser.parse_args(argv)
    try:
        build_dir = build_twin()
        if args.command == "check":
            return check(build_dir)
        if args.command == "bench":
            only = set(args.functions.split(",")) if args.functions else None
            return bench(args.runs, args.baseline, args.importtime, only)
    except ArtifactCheckFailed as error:
        print(f"check-artifacts: {error}", file=sys.stderr)
        return 1
    return 0


def bench(runs: int, baseline: str | None, importtime: bool = True, only: set[str] | None = None) -> int:
    """The cold-start table on its own stack (migrated and seeded), as `make bench` prints it."""
    from infra.local_stack import seeded_stack

    with seeded_stack("candlecast-cold-bench", quiet=False) as stack:
        cold_start_table(stack, runs, baseline, importtime, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
