"""The jitted HF step makes no host round trip: no callback, no transfer in either direction.

A step that syncs with the host (a ``jax.debug.callback``, a ``pure_callback``, an
``io_callback``, a ``jax.debug.print``) stalls the accelerator's pipeline at every outer step.
Two checks, each with a negative control that shows it can fail:

* dynamic: several outer steps run under ``jax.transfer_guard("disallow_explicit")``, which
  refuses every transfer, explicit or implicit, in every direction. On an accelerator a host
  callback fetches its operands (device to host); on the CPU backend the operands are already
  host memory and the device-to-host guard never fires, but the callback machinery still puts
  its operands back as arrays (host to device), which the guard refuses, so the test fails on
  both.
* static: the lowered program holds no host-callback custom call (named
  ``xla_ffi_python_{cpu,gpu}_callback`` and alike), whatever the backend.

The data pipeline (reading the next sample sizes, drawing and placing batches) runs outside
the guard: it is the training loop's business, not the step's.
"""

import contextlib
import re

import jax
import numpy as np
import optax
import pytest
import toy

import hfjax

_SCHEDULES = {
  # Sizes that grow during the run: a new program per size.
  "geometric": dict(
    gradient_schedule=hfjax.geometric_schedule(16, 32, factor=2.0),
    curvature_schedule=hfjax.geometric_schedule(8, 16, factor=2.0),
  ),
  # The same code in the step, started at the maximum: one program.
  "geometric_at_maximum": dict(
    gradient_schedule=hfjax.geometric_schedule(32, 32, factor=2.0),
    curvature_schedule=hfjax.geometric_schedule(16, 16, factor=2.0),
  ),
  "variance": dict(gradient_schedule=hfjax.variance_test_schedule(16, 32, theta=0.5)),
  "caller": {},  # no schedule: the caller picks the sizes, the state tracks none
}

# Every preconditioner with a geometric schedule in the step, and every kind of schedule on
# the cheapest preconditioner (the schedule's code does not depend on the preconditioner);
# compiling dominates the time, so only two cases compile more than one program.
_CASES = [(name, "geometric_at_maximum") for name in hfjax.optimizer.PRECONDITIONERS] + [
  ("none", "geometric"),
  ("none", "variance"),
  ("none", "caller"),
]

_NUM_STEPS = 3
_PROGRAMS = {"geometric": 2, "variance": 2}  # batch shapes the growing schedules visit
_DATA = toy.regression_data(64)


def _transform(preconditioner, schedule, **options):
  return hfjax.hessian_free(
    toy.apply_fn,
    toy.loss_fn,
    preconditioner=preconditioner,
    max_cg_steps=8,
    initial_damping=1.0,
    **_SCHEDULES[schedule],
    **options,
  )


def _with_host_callback(tx):
  """``tx`` whose update also reports the damping to the host, as a debugging print would."""

  def update(updates, state, params=None, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    jax.debug.callback(lambda damping: None, optax.tree.get(state, "damping"))
    return updates, state

  return optax.GradientTransformationExtraArgs(tx.init, update)


@contextlib.contextmanager
def _guard():
  """The strictest transfer guard, set globally: ``jax.transfer_guard`` is thread-local, and
  the CPU client may run a program, and so its host callbacks, on a worker thread."""
  previous = jax.config.jax_transfer_guard
  jax.config.update("jax_transfer_guard", "disallow_explicit")
  try:
    yield
  finally:
    jax.config.update("jax_transfer_guard", previous)


def _run_guarded(tx, num_steps=_NUM_STEPS):
  """``num_steps`` jitted steps, each run under the strictest transfer guard; returns the
  host-callback custom calls of every program compiled, the number of programs and the last
  state.

  The step is compiled ahead of time outside the guard, once per batch shape (tracing may
  evaluate constants on the host, which is no cost per step); only running it is guarded.
  """
  step = toy.make_step(tx)
  sampler = hfjax.BatchSampler(_DATA, seed=0)
  params = jax.device_put(toy.init_params())
  state = jax.device_put(tx.init(params))
  compiled, callbacks = {}, []
  for _ in range(num_steps):
    try:
      sizes = hfjax.sample_sizes(state)
    except ValueError:  # no schedule: the caller's own sizes
      sizes = (32, 16)
    batches = jax.device_put(sampler.sample_pair(*sizes))
    args = jax.block_until_ready((params, state, *batches))
    if sizes not in compiled:
      lowered = step.lower(*args)
      callbacks += _callback_targets(lowered.as_text())
      compiled[sizes] = lowered.compile()
    with _guard():
      params, state = jax.block_until_ready(compiled[sizes](*args))
  return callbacks, len(compiled), state


def _callback_targets(program: str) -> list[str]:
  """The host-callback custom calls in a lowered program's text."""
  return [t for t in re.findall(r"custom_call\s*@(\w+)", program) if "callback" in t]


@pytest.mark.parametrize("preconditioner, schedule", _CASES)
def test_jitted_step_makes_no_host_transfer(preconditioner, schedule):
  callbacks, programs, state = _run_guarded(_transform(preconditioner, schedule))
  assert callbacks == []
  assert programs == _PROGRAMS.get(schedule, 1)  # the growing schedules did grow
  assert int(state.count) == _NUM_STEPS
  assert int(state.info.total_rejections) < _NUM_STEPS  # it trained
  assert np.isfinite(float(state.info.loss_after))


def test_a_host_callback_in_the_step_is_caught():
  """The negative control: the same step with one ``jax.debug.callback`` fails both checks."""
  tx = _with_host_callback(_transform("none", "geometric_at_maximum"))
  with pytest.raises(Exception, match="Disallowed"):
    _run_guarded(tx, num_steps=1)
  params = toy.init_params()
  batch = jax.tree.map(lambda a: a[:32], _DATA)
  args = (params, tx.init(params), batch, jax.tree.map(lambda a: a[:16], batch))
  assert _callback_targets(toy.make_step(tx).lower(*args).as_text())
