"""Shared fixtures: a fresh Kernel per test, always torn down so no model thread outlives it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kmemcg import Kernel
from kmemcg.pytest_plugin import register_kernel


@pytest.fixture
def kernel(request):
    k = Kernel(name="test")
    register_kernel(request.node, k)  # its held locks are dumped if the test times out
    yield k
    k.shutdown(timeout=5.0)


@pytest.fixture
def kernels() -> Iterator[Callable[..., Kernel]]:
    """``make(config=None, **Kernel kwargs)``: several kernels in one test, each shut down
    after it, with no model thread left behind."""
    made: list[Kernel] = []

    def make(config: Any = None, **kw: Any) -> Kernel:
        k = Kernel(config=config, name=f"k{len(made)}", **kw)
        made.append(k)
        return k

    yield make
    for k in made:
        assert k.shutdown(timeout=5.0) == [], f"{k.name}: threads left behind"
