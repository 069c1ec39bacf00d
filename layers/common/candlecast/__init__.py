"""candlecast: the shared layer of the crypto price-forecast service."""

__version__ = "0.1.0"
