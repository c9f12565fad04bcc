"""Shared test configuration.

Hypothesis runs a fast profile by default so `make test` stays quick; set
TIERGATE_HYPOTHESIS_PROFILE=thorough for many more examples per property.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("TIERGATE_HYPOTHESIS_PROFILE", "fast"))

ROOT = Path(__file__).resolve().parent.parent
CLINC_DIR = ROOT.parent / "shared" / "data" / "clinc150"


@pytest.fixture(scope="session")
def clinc150() -> dict[str, list[list[str]]]:
    """The CLINC150 'full' split, or a skip where the shared data is absent."""
    import json

    path = CLINC_DIR / "data_full.json"
    if not path.exists():
        pytest.skip(
            f"CLINC150 not found at {path}: it lives in the shared data folder beside the "
            "repository, which a user's clone does not have"
        )
    with path.open(encoding="utf-8") as f:
        data: dict[str, list[list[str]]] = json.load(f)
    return data
