"""Lambda SnapStart runtime hooks (snapshot_restore_py, which the python3.12 managed runtime provides).

Before the snapshot: import what the first request would import lazily (numpy, pyarrow and the model code
where the science layer is attached), then drop every connection and secret made during init, so none is
frozen into the snapshot. After each restore: drop them again (a restored environment is one of many
copies), and reseed the random generators, which every copy would otherwise share. Verified models stay:
they are public, immutable and checked against the registered sha256 on use.

Outside Lambda (or without SnapStart) registering is harmless: the hooks are never called.
"""

import importlib
import os
import random
import sys

# Imported lazily by the create path; warmed into the snapshot where they exist.
WARM_MODULES = ("numpy", "pyarrow", "pyarrow.compute", "pyarrow.parquet", "candlecast.forecast.model",
                "candlecast.candles")


def warm_imports() -> list[str]:
    warmed = []
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # no science layer on this function
            continue
        warmed.append(name)
    return warmed


def forget_connections_and_secrets() -> None:
    """Close the database pool and the Redis and S3 clients, and forget cached secrets."""
    from candlecast import cache, db, storage
    from candlecast.config import forget_secrets

    db.close_pool()
    cache.reset_client()
    storage.reset_clients()
    forget_secrets()  # the Secrets Manager client and the values it keeps


def reseed_random() -> None:
    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def before_snapshot() -> None:
    warm_imports()
    forget_connections_and_secrets()


def after_restore() -> None:
    forget_connections_and_secrets()
    reseed_random()


_registered = False


def register() -> bool:
    """Register the hooks once per process; False where snapshot_restore_py is absent."""
    global _registered
    try:
        from snapshot_restore_py import register_after_restore, register_before_snapshot
    except ImportError:
        return False
    if not _registered:
        register_before_snapshot(before_snapshot)
        register_after_restore(after_restore)
        _registered = True
    return True
