"""Shared fixtures: a fresh Kernel per test, always torn down so no model thread outlives it."""

from __future__ import annotations

import pytest

from kmemcg import Kernel


@pytest.fixture
def kernel():
    k = Kernel(name="test")
    yield k
    k.shutdown(timeout=5.0)
