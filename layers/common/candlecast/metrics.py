"""The functions' CloudWatch metrics (Powertools, embedded metric format): one namespace, and the dimensions every
metric of a function carries."""

import os

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from candlecast.config import get_settings


def function_metrics() -> Metrics:
    """Powertools' Metrics in the service's namespace (POWERTOOLS_METRICS_NAMESPACE, default Candlecast)."""
    return Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Candlecast"))


def metric_dimensions(function: str) -> dict[str, str]:
    """The dimensions of every metric a function emits (besides `service`): its stage and which function, so dev
    and prod, and one function and another, are not summed together. Both are few (README, Alarms)."""
    return {"stage": get_settings().stage, "function": function}


def add_counts(metrics: Metrics, **counts: int) -> None:
    """Each of `counts` as a Count metric of that name (a scheduled run's report: README, Alarms)."""
    for name, value in counts.items():
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
