"""GET /health — the database, cache and storage, each with its latency."""

from candlecast.api import create_resolver, json_response, lambda_handler_for
from candlecast.services import health

app = create_resolver()


@app.get("/health", summary="Service health", description="200 ok or degraded; 503 when the database is down.")
def get_health():
    status_code, body = health.check()
    return json_response(body, status_code)


lambda_handler = lambda_handler_for(app)
