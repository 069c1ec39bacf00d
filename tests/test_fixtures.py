"""The shared fixtures leave the environment as each test needs it, whichever test files ran before in the session."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFTEST = '''
from types import SimpleNamespace

import pytest

from infra.local_stack import LocalStack
from tests.conftest import app_env, committed_models_key  # noqa: F401


@pytest.fixture(scope="session")
def stack():
    """The real stack's variables, without starting its servers."""
    servers = SimpleNamespace(database_url="postgresql://stub/candlecast", redis_url="redis://stub:1",
                              s3_endpoint_url="http://stub:1", bucket="stub")
    return SimpleNamespace(environment=lambda: LocalStack.environment(servers))
'''

TRAINS_FIRST = '''
import pytest

pytestmark = pytest.mark.usefixtures("committed_models_key")


def test_trains():
    pass


def test_reads_the_stack(app_env):
    pass
'''

SERVES_SEEDED_MODELS = '''
import os


def test_the_stack_has_the_committed_models_key(app_env):
    assert os.environ.get("STAGE") == "local" and os.environ.get("MODEL_SIGNING_KEY")
'''


@pytest.mark.parametrize("order", [("test_a.py", "test_b.py"), ("test_b.py", "test_a.py")])
def test_a_module_wide_key_does_not_take_the_stacks_key_away_from_later_modules(tmp_path, order):
    """committed_models_key (module-wide) patched STAGE and MODEL_SIGNING_KEY when they were unset; app_env, set up
    after it in the same module, set them for the session; the patch's undo at the module's end unset them under
    every later module: test_local_track_record failed after test_forecast_tiny_data."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_a.py").write_text(TRAINS_FIRST)
    (tmp_path / "test_b.py").write_text(SERVES_SEEDED_MODELS)
    env = {name: value for name, value in os.environ.items() if name not in ("STAGE", "MODEL_SIGNING_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "layers" / "common")])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *order], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
