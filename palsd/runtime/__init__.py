"""Wiring: configuration, the daemon's tick loop, signals and service notification."""
