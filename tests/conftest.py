"""Hypothesis in CI: derandomized, so a CI run replays the same examples every time and a
submission is never failed by a case that an unlucky seed happened to draw (that case would
still be a bug: a local run, random as usual, is where new cases are searched for; a failing
one prints its reproduce blob). CI sets CI=true; nothing else changes."""

from __future__ import annotations

import os

from hypothesis import settings

if os.environ.get("CI"):
    settings.register_profile("palsd-ci", derandomize=True, deadline=None, print_blob=True)
    settings.load_profile("palsd-ci")
