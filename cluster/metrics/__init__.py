"""Prometheus metrics: their definitions, the recorder, and the standalone /metrics server."""
