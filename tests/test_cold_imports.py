"""Functions that do not forecast never import the science layer (numpy, pyarrow, joblib) nor boto3.

(Powertools itself imports botocore, which the Lambda runtime provides.)
"""

import json
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
    ("function", "event"),
    [("health", "health.json"), ("symbols", "symbols_search.json"), ("symbols", "symbol_get.json"),
     ("predictions_get", "prediction_get.json")],
)
def test_light_functions_import_no_heavy_modules(migrated_db, function, event):
    script = SCRIPT.format(root=str(ROOT), function=f"functions/{function}",
                           event=(EVENTS / event).read_text())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**migrated_db.environment(), "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["status"] in (200, 404)
    assert measured["heavy"] == []
