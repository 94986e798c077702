"""Shared fixtures: a fresh Kernel per test, always torn down so no model thread outlives it."""

from __future__ import annotations

import pytest

from kmemcg import Kernel
from kmemcg.pytest_plugin import register_kernel


@pytest.fixture
def kernel(request):
    k = Kernel(name="test")
    register_kernel(request.node, k)  # its held locks are dumped if the test times out
    yield k
    k.shutdown(timeout=5.0)
