"""Forecast models: numpy-only inference (model.py, artifact.py); training and backtests need the `train` extra."""
