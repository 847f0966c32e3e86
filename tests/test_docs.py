"""Runs the doctest examples in every module of hfjax."""

import doctest
import importlib
import pkgutil

import pytest

import hfjax

# Modules whose public functions carry examples: a doctest run that finds none is a failure.
WITH_EXAMPLES = (
  "hfjax.curvature",
  "hfjax.optimizer",
  "hfjax.precision",
  "hfjax.sampling",
  "hfjax.solvers",
)
MODULES = sorted(
  info.name for info in pkgutil.walk_packages(hfjax.__path__, prefix=f"{hfjax.__name__}.")
)


def test_every_module_is_collected():
  assert set(WITH_EXAMPLES) <= set(MODULES)


@pytest.mark.parametrize("name", ["hfjax"] + MODULES)
def test_doctests(name):
  module = importlib.import_module(name)
  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
  )
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed"
  if name in WITH_EXAMPLES:
    assert result.attempted > 0
