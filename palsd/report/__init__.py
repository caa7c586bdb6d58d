"""Reporting adapters: Prometheus exporter, status model, structured logs."""
