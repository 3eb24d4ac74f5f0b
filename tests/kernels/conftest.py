"""Fixtures of the kernel op suites (the pieces themselves live in kernel_cases.py)."""
from __future__ import annotations

import pytest

from kernel_cases import ON_GPU, ROWS, seeded


@pytest.fixture(params=ROWS, ids=lambda r: r.id)
def row(request):
    """One backend row (see kernel_cases.ROWS); the CPU ISA level is active while the test runs."""
    r = request.param
    with pytest.MonkeyPatch.context() as mp:
        if r.backend == "triton" and not ON_GPU:
            mp.setenv("TRITON_INTERPRET", "1")  # triton reads it during interpretation too
        with r.active():
            yield r


@pytest.fixture
def gen(request):
    """Seeded from the run's SEED and the test id: fresh data each run, reproducible on demand."""
    return seeded(request.node.nodeid)
