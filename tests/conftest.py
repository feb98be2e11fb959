"""Shared test setup: strict dtype promotion, float32, the golden fixtures (kept in tests/fixtures)."""

import os

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def fake_devices_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` fake CPU devices. The collectives' rendezvous waits up to 10 min instead of 40 s:
  8 device threads on 2 loaded cores can arrive that late, and XLA then aborts the process."""
  return (f"--xla_force_host_platform_device_count={devices} "
          "--xla_cpu_collective_call_terminate_timeout_seconds=600")


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
