"""Lambda's side of a local invoke: a function "container" that imports its module once (the cold start),
with the function's folder and layers on sys.path and its environment set, then runs its handler per event.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from infra.lambda_loader import LambdaContext, load_function_module
from infra.sam_template import FunctionSpec

MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # Lambda's synchronous response limit

log = logging.getLogger("local_api")


class FunctionRuntime:
    """One function 'container': its module is imported once, on first use (cold start), then reused."""

    _import_lock = threading.Lock()  # sys.path and os.environ are process-wide

    def __init__(self, spec: FunctionSpec, environment: Mapping[str, str]):
        self.spec = spec
        self.environment = dict(environment)
        self._module: ModuleType | None = None
        self.init_ms: float | None = None

    @property
    def module(self) -> ModuleType:
        if self._module is None:
            with self._import_lock:
                if self._module is None:
                    self._module = self._import()
        return self._module

    def _import(self) -> ModuleType:
        spec = self.spec
        if not spec.module_file.is_file():
            raise FileNotFoundError(f"{spec.logical_id}: handler module {spec.module_file} does not exist")
        os.environ.update(self.environment)
        # Lambda's order: the function's code (/var/task) first, then the layers (/opt/python).
        for layer in reversed(spec.layer_dirs):
            if str(layer) not in sys.path:
                sys.path.insert(0, str(layer))
        sys.path.insert(0, str(spec.code_dir))
        started = time.perf_counter()
        try:
            module = load_function_module(spec.code_dir, spec.handler)
        finally:
            sys.path.remove(str(spec.code_dir))
        self.init_ms = (time.perf_counter() - started) * 1000
        log.info("%s: cold start, imported %s in %.0f ms", spec.logical_id, spec.module_file, self.init_ms)
        return module

    @property
    def handler(self):
        return getattr(self.module, self.spec.handler_name)

    def new_context(self, request_id: str | None = None) -> LambdaContext:
        return LambdaContext(self.spec.logical_id, memory_mb=self.spec.memory_mb,
                             timeout_seconds=self.spec.timeout_s, request_id=request_id)

    def invoke(self, event: Mapping, request_id: str | None = None) -> Any:
        handler = self.handler
        context = self.new_context(request_id)
        started = time.monotonic()
        result = handler(event, context)
        elapsed = time.monotonic() - started
        if elapsed > self.spec.timeout_s:
            log.warning("%s took %.1f s, over its %.0f s timeout (Lambda would have stopped it)",
                        self.spec.logical_id, elapsed, self.spec.timeout_s)
        # Lambda serialises the result: what JSON cannot hold fails (Runtime.MarshalError), as does > 6 MB.
        payload = json.dumps(result)
        if len(payload) > MAX_RESPONSE_BYTES:
            raise ValueError(f"{self.spec.logical_id} returned {len(payload)} bytes; Lambda's limit is 6 MB")
        return json.loads(payload)
