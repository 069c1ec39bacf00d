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
    ("function", "event", "status"),
    [("health", "health.json", 200), ("symbols", "symbols_search.json", 200), ("symbols", "symbol_get.json", 404),
     ("predictions_get", "prediction_get.json", 404), ("symbols", "models_list.json", 200),
     ("symbols", "model_get.json", 404)],
)
def test_light_functions_import_no_heavy_modules(clean_db, function, event, status):
    script = SCRIPT.format(root=str(ROOT), function=f"functions/{function}",
                           event=(EVENTS / event).read_text())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**clean_db.environment(), "PATH": "/usr/bin:/bin"})
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["status"] == status  # an empty database: no such symbol, prediction or active model
    assert measured["heavy"] == []
