"""POST /predictions — 30 expected candles with calibrated intervals for a symbol and timeframe."""

from candlecast import startup

startup.begin()  # no garbage collection while the function's modules load

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Body, Header

from candlecast.api import X_CACHE, create_resolver, described, documented, json_response, lambda_handler_for
from candlecast.schemas import PredictionRequest, PredictionWithSteps
from candlecast.services import forecasting

app = create_resolver()
forecasting.prepare()
READ_BACK = {"GetPrediction": {"operationId": "get_prediction",
                               "parameters": {"id": "$response.body#/id"}}}


@app.post(
    "/predictions",
    operation_id="create_prediction",
    summary="Create a forecast",
    description=(
        "Returns 30 expected candles (open/high/low/close built from the median path), the 80% and 95% "
        "intervals of each close, and a calibrated per-step confidence. 201 for a new prediction; 200 with "
        "X-Cache: HIT for a repeat within 15 minutes of the same symbol, timeframe, model and candles (their "
        "content, not only the last one's time) sent without an Idempotency-Key, or for a repeated "
        "Idempotency-Key. A request with a new Idempotency-Key is always a new prediction (201): the key, not the "
        "15-minute window, then says what a repeat is."
    ),
    responses=documented(PredictionWithSteps, 400, 404, 409, 413, 415, 422, 503, status=201, links=READ_BACK)
    | {200: described(PredictionWithSteps, "a repeat: the stored prediction", X_CACHE, READ_BACK)},
)
def create_prediction(
    request: Annotated[PredictionRequest, Body()],
    idempotency_key: Annotated[
        str | None, Header(alias="idempotency-key", max_length=255, pattern=r"^[\x21-\x7e]+$",
                           description="Makes a create safe to retry: a retry with the same key, after a timeout or "
                           "a 5xx too, gets the prediction the key created (200), never a second one; the key with "
                           "another symbol or timeframe is a 409. Visible ASCII, at most 255 characters.")
    ] = None,
):
    result = forecasting.create(request, idempotency_key)
    if result.created:
        return json_response(result.body, 201)
    return json_response(result.body, 200, {"X-Cache": "HIT"})


lambda_handler = lambda_handler_for(app, "predictions_create")

startup.done()  # the function is loaded: freeze it and collect again
