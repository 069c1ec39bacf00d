"""What a function imports inside its first request: functions that do not forecast never import the science layer
(numpy, pyarrow, joblib) nor boto3 (but Health, which lists the model files, at init), and those that do import it
at init.

(Powertools itself imports botocore, which the CommonLayer ships.)
"""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import EVENTS, ROOT

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from infra.lambda_loader import LambdaContext, load_handler
response = load_handler({function!r})(json.loads({event!r}), LambdaContext())
heavy = sorted(name for name in ("numpy", "pyarrow", "joblib", "pandas", "boto3") if name in sys.modules)
print(json.dumps({{"status": response["statusCode"], "heavy": heavy}}))
"""


@pytest.mark.parametrize(
    ("function", "event", "status", "heavy"),
    [("health", "health.json", 200, ["boto3"]),  # its S3 client lists the model files (built at init, below)
     ("symbols", "symbols_search.json", 200, []), ("symbols", "symbol_get.json", 404, []),
     ("predictions_get", "prediction_get.json", 404, []), ("symbols", "models_list.json", 200, []),
     ("symbols", "model_get.json", 404, [])],
)
def test_light_functions_import_no_heavy_modules(clean_db, function, event, status, heavy):
    script = SCRIPT.format(root=str(ROOT), function=f"functions/{function}",
                           event=(EVENTS / event).read_text())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**clean_db.environment(), "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["status"] == status  # an empty database: no such symbol, prediction or active model
    assert measured["heavy"] == heavy


HEALTH_SCRIPT = """
import json, ssl, sys
sys.path.insert(0, {root!r})
tls = {{"init": 0, "invoke": 0}}
phase = "init"
build = ssl.create_default_context
def counted(*args, **kwargs):
    tls[phase] += 1
    return build(*args, **kwargs)
ssl.create_default_context = counted
from infra.lambda_loader import LambdaContext, load_handler
handler = load_handler("functions/health")
loaded = set(sys.modules)
phase = "invoke"
response = handler(json.loads({event!r}), LambdaContext())
body = json.loads(response["body"])
print(json.dumps({{"status": response["statusCode"], "storage": body["checks"]["storage"]["status"], "tls": tls,
                  "imported": sorted(set(sys.modules) - loaded)}}))
"""
# The first connection to a host by name encodes it with the IDNA codec, which Python imports then.
HOST_NAME_CODEC = {"encodings.idna", "stringprep", "unicodedata"}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_health_builds_at_init_what_its_first_check_needs(clean_db, scheme):
    """Lambda runs init on a full vCPU and an invoke on the memory's share: the first health check imports
    nothing (boto3 and the S3 client that lists the model files are built at init), and the bucket check's TLS
    context (a CA store load) is built at init when S3 is HTTPS, never over plain HTTP."""
    environment = clean_db.environment()
    if scheme == "https":  # a TLS endpoint that is not there: storage is down, which is enough here
        environment["S3_ENDPOINT_URL"] = "https://127.0.0.1:9"
    script = HEALTH_SCRIPT.format(root=str(ROOT), event=(EVENTS / "health.json").read_text())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**environment, "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["status"] == 200
    assert measured["storage"] == ("up" if scheme == "http" else "down")
    assert measured["tls"] == {"init": 1 if scheme == "https" else 0, "invoke": 0}
    assert set(measured["imported"]) <= HOST_NAME_CODEC


CREATE_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
sys.modules["pandas"] = None  # not in the science layer; pyarrow imports it when it can
phase, connects = "init", {{"init": 0, "invoke": 0}}
def audit(event, args):
    if event == "socket.connect":
        connects[phase] += 1
sys.addaudithook(audit)
from infra.lambda_loader import LambdaContext, load_handler
handler = load_handler("functions/predictions_create")
loaded = set(sys.modules)
phase = "invoke"
response = handler(json.loads({event!r}), LambdaContext())
from candlecast import storage
print(json.dumps({{"status": response["statusCode"], "connects": connects, "candle_files_read": len(storage._memory),
                  "imported": sorted(set(sys.modules) - loaded)}}))
"""


def _run_create(environment: dict) -> dict:
    script = CREATE_SCRIPT.format(root=str(ROOT), event=(EVENTS / "predictions_create.json").read_text())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**environment, "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("redis", ["empty", "down"])
def test_create_builds_at_init_what_its_first_request_needs(seeded, redis, tmp_path):
    """The first create after init, whose candles come from S3 (Redis holds none, or is down: a warm container
    that always found them in Redis is in the same place) and its model from the artifact as deployed, imports
    nothing: numpy, pyarrow, joblib and the model code loaded at init, which built the S3 filesystem. (Python's
    sockets only: libpq and pyarrow's S3 client connect below them; the test below has init with all down.)"""
    shutil.copytree(ROOT / "models", tmp_path / "models")  # what functions/predictions_create/Makefile ships
    environment = {**seeded.environment(), "LAMBDA_TASK_ROOT": str(tmp_path)}
    if redis == "down":
        environment["REDIS_URL"] = "redis://127.0.0.1:9/0"
    measured = _run_create(environment)
    assert measured["status"] == 201
    assert measured["candle_files_read"] == 1  # the candles came from the file in S3
    assert measured["connects"]["init"] == 0
    assert set(measured["imported"]) <= HOST_NAME_CODEC


def test_create_init_succeeds_with_every_dependency_down(migrated_db):
    """Init connects to nothing: with PostgreSQL, Redis and S3 all unreachable the function loads, and its first
    request answers 503."""
    environment = {**migrated_db.environment(), "DATABASE_URL": "postgresql://candlecast@127.0.0.1:9/candlecast",
                   "REDIS_URL": "redis://127.0.0.1:9/0", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    measured = _run_create(environment)
    assert measured["status"] == 503
    assert measured["connects"]["init"] == 0
