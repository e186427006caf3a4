"""Shared test setup: fixture modules, the ../shared data locator, markers.

Fixture modules live in tests/fixtures/ (one concern each) and are loaded here, so any
test can ask for `ray_local`, `moto_s3`, `image_factory`, `tiny_bundle`, ... by name.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = [
    "tests.fixtures.shared_data",
    "tests.fixtures.ray_local",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.images",
    "tests.fixtures.ray_head",
    "tests.fixtures.label_output",
]
