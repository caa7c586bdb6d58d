"""Hypothesis settings for palsd's fuzz tests (API bodies, config files), chosen by the
environment variable PALSD_FUZZ: `ci` (the default, what `make test` runs: 2,000 cases each),
`deep` (50,000 each, for a long run) or `quick` (200, while editing). Applied per test, so the
other property tests keep their own settings.

    PALSD_FUZZ=deep .venv/bin/pytest -q tests/unit/test_api_fuzz.py tests/unit/test_config_fuzz.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # a shared, busy machine: never fail a case for being slow
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    "print_blob": True,
}
settings.register_profile("fuzz-ci", max_examples=2000, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("fuzz-deep", max_examples=50_000, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("fuzz-quick", max_examples=200, **_COMMON)  # type: ignore[arg-type]

FUZZ = settings.get_profile(f"fuzz-{os.environ.get('PALSD_FUZZ', 'ci')}")
