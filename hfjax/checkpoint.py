"""Checkpoint and resume Hessian-free training with Orbax.

A checkpoint holds the parameters, the whole optimizer state (damping, warm start, L-BFGS
memory, sampling schedule, diagnostics and PRNG keys) and a small JSON document ``extra`` for
the host-side position of the run, e.g. the epoch and the state of a
:class:`hfjax.BatchSampler` (its ``state_dict()``). Arrays are stored exactly, so a run
resumed from step ``k`` ends with the same bits as one that never stopped.

Example::

  save_checkpoint(workdir, step, params, opt_state, extra={"sampler": sampler.state_dict()})
  ...
  if latest_step(workdir) is not None:
    step, params, opt_state, extra = restore_checkpoint(workdir, params, opt_state)
    sampler.load_state_dict(extra["sampler"])

A checkpoint is written into a temporary directory (``<step>.orbax-checkpoint-tmp``) and
renamed to ``<step>`` once complete, so a process killed while saving leaves no checkpoint
that :func:`latest_step` or :func:`restore_checkpoint` would take (and the next save of that
step replaces the leftover); ``tests/test_crash_safety.py`` kills a training run mid-save.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``jax.random.key_data`` and
rewrapped with the implementation of the matching leaf of ``opt_state_like`` on restore, which
does not depend on how a given Orbax version treats key arrays. On several hosts, call these
functions on every process with the same arguments (Orbax writes each host's shards and
synchronises); restored arrays take the shardings of the ``*_like`` arrays.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_ARRAYS = "state"
_EXTRA = "extra"


def _path(directory: Any) -> str:
  path = os.fspath(directory)
  return path if "://" in path else os.path.abspath(path)


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(like: Any) -> Any:
  """The restore target of one leaf: shape, dtype and sharding of ``like`` (keys as data)."""
  if isinstance(like, jax.ShapeDtypeStruct):
    if _is_key(like):
      data = jax.eval_shape(jax.random.key_data, like)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=like.sharding)
    return like
  if not isinstance(like, jax.Array):
    like = jnp.asarray(like)
  if _is_key(like):
    like = jax.random.key_data(like)
  return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=like.sharding)


def _key_impl(like: Any) -> Any:
  """The PRNG implementation of a key array or of a key ``jax.ShapeDtypeStruct``."""
  found = []
  # key_impl needs an array; tracing one from the struct gives it without allocating.
  jax.eval_shape(lambda key: found.append(jax.random.key_impl(key)), like)
  return found[0]


def _data_to_keys(tree: Any, like: Any) -> Any:
  def rewrap(x, like_leaf):
    return jax.random.wrap_key_data(x, impl=_key_impl(like_leaf)) if _is_key(like_leaf) else x

  return jax.tree.map(rewrap, tree, like)


def _manager(
  directory: Any, keep: int | None = None, *, create: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(_path(directory), options=options)


def save_checkpoint(
  directory: Any,
  step: int,
  params: Any,
  opt_state: Any,
  *,
  extra: Any = None,
  keep: int | None = 3,
) -> None:
  """Writes ``params``, ``opt_state`` and ``extra`` as checkpoint ``step`` of ``directory``.

  Returns once the checkpoint is complete on disk.

  Args:
    directory: the checkpoint directory (created if needed); a local path or an Orbax-
      supported URL such as ``gs://``.
    step: the step number, a non-negative integer not already saved there.
    params: the parameters, any pytree of arrays.
    opt_state: the optimizer state (of :func:`hfjax.hessian_free` or a chain around it).
    extra: any JSON-serialisable value (dicts, lists, numbers, strings, ``None``), e.g.
      ``{"epoch": 3, "sampler": sampler.state_dict()}``.
    keep: the newest checkpoints to keep (older ones are deleted); ``None`` keeps all.
  """
  if int(step) != step or step < 0:
    raise ValueError(f"step must be an integer >= 0, got {step!r}.")
  if keep is not None and (int(keep) != keep or keep < 1):
    raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}.")
  arrays = _keys_to_data({"params": params, "opt_state": opt_state})
  args = ocp.args.Composite(
    **{_ARRAYS: ocp.args.StandardSave(arrays), _EXTRA: ocp.args.JsonSave({"extra": extra})}
  )
  manager = _manager(directory, keep, create=True)
  try:
    # force: save even when a newer step exists (Orbax would otherwise skip silently).
    manager.save(int(step), args=args, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def latest_step(directory: Any) -> int | None:
  """The newest step saved in ``directory``, or ``None`` when there is none."""
  path = _path(directory)
  if "://" not in path and not os.path.isdir(path):
    return None
  manager = _manager(path)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_checkpoint(
  directory: Any, params_like: Any, opt_state_like: Any, *, step: int | None = None
) -> tuple[int, Any, Any, Any]:
  """Reads a checkpoint written by :func:`save_checkpoint`.

  Args:
    directory: the checkpoint directory.
    params_like: a pytree with the structure, shapes, dtypes (and shardings) of the saved
      params: arrays, e.g. freshly initialised params, or ``jax.ShapeDtypeStruct``\\ s.
    opt_state_like: the same for the optimizer state, e.g. ``tx.init(params)``.
    step: the step to read; ``None`` for the newest.

  Returns:
    ``(step, params, opt_state, extra)``, the trees in the structure of the ``*_like`` ones.

  Raises:
    FileNotFoundError: when ``directory`` holds no checkpoint (or not ``step``).
  """
  path = _path(directory)
  available = latest_step(path)
  if available is None:
    raise FileNotFoundError(f"no checkpoint in {path}.")
  manager = _manager(path)
  try:
    if step is None:
      step = available
    elif step not in manager.all_steps():
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {path}; saved steps: {sorted(manager.all_steps())}."
      )
    like = {"params": params_like, "opt_state": opt_state_like}
    target = jax.tree.map(_abstract, like)
    restored = manager.restore(
      int(step),
      args=ocp.args.Composite(
        **{_ARRAYS: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()}
      ),
    )
  finally:
    manager.close()
  arrays = _data_to_keys(restored[_ARRAYS], like)
  return int(step), arrays["params"], arrays["opt_state"], restored[_EXTRA]["extra"]
