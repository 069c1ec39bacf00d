"""Checks shared by the forecast tests: the committed model files, and predict() against the walk-forward."""


import numpy as np

from candlecast.candles import Candles
from candlecast.forecast.model import ForecastModel
from tests.conftest import ROOT


def shipped_model(timeframe: str) -> ForecastModel:
    """The committed models/{timeframe}.pkl, verified under the local signing key."""
    from candlecast.config import LOCAL_MODEL_SIGNING_KEY
    from candlecast.forecast import artifact

    data = (ROOT / "models" / f"{timeframe}.pkl").read_bytes()
    signature = (ROOT / "models" / f"{timeframe}.pkl.sig").read_text().strip()
    return artifact.verify_and_load(data, signature, LOCAL_MODEL_SIGNING_KEY.encode())


def assert_predict_is_what_the_walk_forward_scores(model: ForecastModel, candles: Candles) -> None:
    """predict() on `candles` gives the intervals and confidence evaluation computes at their last origin."""
    from candlecast.forecast.evaluate import build_origins, model_outputs

    origins = build_origins([(None, candles)], model.config)
    q, _, confidence = model_outputs(model, origins.take(slice(-1, None)))
    forecast = model.predict(candles)
    scale = origins.scale[-1]
    np.testing.assert_allclose(np.log(forecast.lower_80 / candles.close[-1]), scale * q[0, :, 1], rtol=1e-9)
    np.testing.assert_allclose(np.log(forecast.upper_95 / candles.close[-1]), scale * q[0, :, 6], rtol=1e-9)
    np.testing.assert_allclose(forecast.confidence, confidence[0], rtol=1e-9)
