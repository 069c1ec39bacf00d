"""80 % coverage: the one figure called `accuracy`, and when its live value says a model has drifted (no imports)."""

# The manifest's `accuracy` is this on the walk-forward test (held-out coins); the models row's is this live.
ACCURACY_DEFINITION = ("80 % coverage: the share of outcomes whose close fell inside the 80 % interval "
                       "(a calibrated model sits near 0.80)")
DRIFT_BAND = (0.72, 0.88)
DRIFT_MIN_STEPS = 500


def is_drifting(n: int, coverage_80: float | None) -> bool:
    """Live 80 % coverage outside DRIFT_BAND over at least DRIFT_MIN_STEPS matured (out-of-sample) steps."""
    return n >= DRIFT_MIN_STEPS and coverage_80 is not None and not DRIFT_BAND[0] <= coverage_80 <= DRIFT_BAND[1]
