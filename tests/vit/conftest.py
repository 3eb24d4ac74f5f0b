"""Fixtures of the ViT tests; the tiny models are in vit_models.py."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test in this folder runs on one thread (``one_thread`` in tests/conftest.py)."""
