"""One verified TLS client context per container, shared by every client that needs no options of its own.

Building a context loads the CA store: 20-30 ms of CPU, which an invoke at 256 MB (0.14 vCPU) turns into
~200 ms. redis-py builds one for every new connection (redis/redis-py#4211) and the bucket check one per check,
so both take this one, and functions build it during init, which Lambda runs on a full vCPU.
"""

import functools
import ssl


@functools.cache
def default_context() -> ssl.SSLContext:
    """ssl.create_default_context(): certificates and host names verified against the system's CA store."""
    return ssl.create_default_context()
