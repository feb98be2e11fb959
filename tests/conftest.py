"""Shared test setup: strict dtype promotion, float32, the golden fixtures (kept in tests/fixtures)."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def load_fixture(name: str) -> dict:
  """A golden fixture's arrays; a missing file fails the test (the fixtures ship with the repo)."""
  path = os.path.join(FIXTURES, name)
  if not os.path.exists(path):
    pytest.fail(f"golden fixture missing: {path} (it is part of the repository; restore it from git)")
  return dict(np.load(path))


@pytest.fixture
def reference_step():
  return load_fixture("reference_step.npz")


@pytest.fixture
def reference_step_auxk():
  return load_fixture("reference_step_auxk.npz")
