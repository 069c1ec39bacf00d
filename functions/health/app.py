"""GET /health — the database, cache and storage, each with its latency."""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from candlecast.api import create_resolver, described, json_response, lambda_handler_for
from candlecast.schemas import HealthReport
from candlecast.services import health

app = create_resolver(validation=False)  # GET /health takes no input
health.prepare()


@app.get("/health", operation_id="get_health", summary="Service health",
         description="200 ok or degraded; 503 when the database is down.",
         responses={200: described(HealthReport,
                                   "ok, or degraded when the cache or storage is down, the cache refuses writes, "
                                   "or an active model's file or signature is not in storage"),
                    503: described(HealthReport, "down: the database is unavailable")})
def get_health():
    status_code, body = health.check()
    return json_response(body, status_code, {"Retry-After": "1"} if status_code == 503 else None)


lambda_handler = lambda_handler_for(app, "health")

startup.done()  # the function is loaded: freeze it and collect again
