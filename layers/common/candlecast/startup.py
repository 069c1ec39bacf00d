"""A function's cold start without garbage collection while its modules load.

Importing a function creates some 60,000 objects that live as long as the container (modules, classes,
validators), and the collector's passes over them while they load cost about 45 ms of CPU per cold start.
Each functions/*/app.py calls `begin()` before its imports and `done()` once its handler is built. `done()`
freezes what is loaded (gc.freeze: later collections, the warm invocations' too, skip it) and turns the
collector back on; the cyclic garbage that importing left behind (about 0.3 MB) stays with it.
"""

import gc

_was_enabled = True


def begin() -> None:
    global _was_enabled
    _was_enabled = gc.isenabled()
    gc.disable()


def done() -> None:
    gc.freeze()
    if _was_enabled:
        gc.enable()
