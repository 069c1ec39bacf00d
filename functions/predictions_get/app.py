"""GET /predictions/{id} — a stored prediction with its steps (cached 15 minutes)."""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Path

from candlecast.api import (
    X_CACHE,
    client_cache,
    create_resolver,
    documented,
    json_response,
    lambda_handler_for,
    path_parameter,
)
from candlecast.schemas import PredictionWithSteps
from candlecast.services import predictions

app = create_resolver()


@app.get("/predictions/<id>", operation_id="get_prediction", summary="A stored prediction with its 30 steps",
         responses=documented(PredictionWithSteps, 400, 404, 503, headers=X_CACHE),
         cache_control=client_cache("prediction", "private"))
def get_prediction(id: Annotated[str, Path(description="the prediction's UUID", json_schema_extra={"format": "uuid"})]):
    body, from_cache = predictions.get(path_parameter(id))
    return json_response(body, 200, {"X-Cache": "HIT" if from_cache else "MISS"})


lambda_handler = lambda_handler_for(app, "predictions_get")

startup.done()  # the function is loaded: freeze it and collect again
