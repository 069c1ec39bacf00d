"""Load a function's `app.py` the way Lambda does: the layer on sys.path, the module imported from its folder.

Every function's module is named `app`, so each is imported under a unique name by file path.
"""

import importlib.util
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
LAYER_PATH = ROOT / "layers" / "common"


def load_function_module(function_dir: Path | str, handler: str = "app.lambda_handler") -> ModuleType:
    function_dir = (ROOT / function_dir).resolve()
    if str(LAYER_PATH) not in sys.path:
        sys.path.insert(0, str(LAYER_PATH))
    module_file, _ = handler.rsplit(".", 1)
    unique_name = f"candlecast_function_{function_dir.name}_{module_file}"
    if unique_name in sys.modules:
        return sys.modules[unique_name]
    spec = importlib.util.spec_from_file_location(unique_name, function_dir / f"{module_file}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[unique_name]
        raise
    return module


def load_handler(function_dir: Path | str, handler: str = "app.lambda_handler"):
    module = load_function_module(function_dir, handler)
    return getattr(module, handler.rsplit(".", 1)[1])


def forget_functions() -> None:
    """Drop loaded function modules, so the next load is a cold start."""
    for name in [name for name in sys.modules if name.startswith("candlecast_function_")]:
        del sys.modules[name]


class LambdaContext:
    """The attributes and method of Lambda's Python context object that handlers and Powertools use."""

    def __init__(self, function_name: str = "candlecast-local", *, memory_mb: int = 512,
                 timeout_seconds: float = 29.0, request_id: str | None = None):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function_name}"
        self.aws_request_id = request_id or str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self.identity = None
        self.client_context = None
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))
