"""One verified TLS client context per container, shared by every client that needs no options of its own.

Building a context loads the CA store: 20-30 ms of CPU, which an invoke at 256 MB (0.14 vCPU) turns into
~200 ms. redis-py would build one for every new connection (redis/redis-py#4211); its TLS connections and the
bucket check share this one instead, which functions build during init, when Lambda gives them a full vCPU.
"""

import functools
import ssl


@functools.cache
def default_context() -> ssl.SSLContext:
    """ssl.create_default_context(): certificates and host names verified against the system's CA store."""
    return ssl.create_default_context()
