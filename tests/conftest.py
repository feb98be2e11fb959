"""Shared test setup: strict dtype promotion, float32, the golden fixture's location."""

import os

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "reference_step.npz")


@pytest.fixture
def reference_step():
  import numpy as np
  if not os.path.exists(FIXTURE):
    pytest.skip(f"golden fixture not found at {FIXTURE}")
  return dict(np.load(FIXTURE))
