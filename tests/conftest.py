"""Shared fixtures for the hfjax tests."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with 64-bit JAX types, without changing the setting for other tests."""
  with jax.enable_x64(True):
    yield
