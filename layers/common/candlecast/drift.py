"""When a model's live 80 % coverage says it has drifted (health and the track record; no imports)."""

DRIFT_BAND = (0.72, 0.88)
DRIFT_MIN_STEPS = 500


def is_drifting(n: int, coverage_80: float | None) -> bool:
    """Live 80 % coverage outside DRIFT_BAND over at least DRIFT_MIN_STEPS matured (out-of-sample) steps."""
    return n >= DRIFT_MIN_STEPS and coverage_80 is not None and not DRIFT_BAND[0] <= coverage_80 <= DRIFT_BAND[1]
