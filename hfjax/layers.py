"""Dense layers of an ``apply_fn``, found on its jaxpr, and their inputs and output cotangents.

A Kronecker-factored (K-FAC) curvature block needs, for each dense layer ``y = a W + b``, the
layer input ``a`` and the cotangent ``g`` of its output. :func:`find_dense_layers` finds the
layers of an arbitrary ``apply_fn(params, inputs)`` by tracing it to a jaxpr, the way
kfac-jax matches patterns on the graph; :func:`layer_statistics` then runs the model once
and returns the inputs ``a`` and a ``backward`` that maps output cotangents to every ``g`` in
one reverse pass.

What is matched. A *dense layer* is a ``dot_general`` one of whose operands is a 2-D
parameter leaf (directly, or through ``convert_element_type``/``copy`` casts and 2-D
``transpose``), contracting exactly one kernel axis with the last axis of the other operand,
the input ``a`` of shape ``(*batch, d_in)``, with no batch dimensions in the dot. ``x @ W``
(``flax.linen.Dense``, ``flax.nnx.Linear``, plain pytrees) contracts kernel axis 0;
``x @ W.T`` and ``einsum("bi,oi->bo", x, W)`` contract axis 1; ``W @ x`` for ``W`` of shape
``(d_out, d_in)`` is matched too. A layer's *bias* is a 1-D parameter leaf of length
``d_out`` added (``add``, possibly after ``broadcast_in_dim``/``reshape``/``squeeze`` and
casts) to that dot's output. The parameter may reach the dot through nested call-like
equations: ``jit``/``pjit``, ``closed_call``, ``checkpoint`` (``remat``), and the bodies of
``custom_jvp_call``/``custom_vjp_call``.

What falls back. Every parameter leaf that is not the kernel or bias of exactly one dense
layer is listed in :attr:`LayerLayout.unmatched` with a reason, for a diagonal fallback:

- a kernel used anywhere else as well, including a second dense use. Shared (tied) weights
  are deliberately not modelled: their curvature block is a *sum* of one Kronecker product
  per use, which is not itself a Kronecker product, and approximating it by one would be a
  guess, not K-FAC;
- parameters of any other operation: convolution kernels (``conv_general_dilated``),
  embedding tables (``gather``), normalisation scales and offsets, parameters used inside
  ``scan``/``while``/``cond`` bodies, parameters returned as outputs;
- a bias whose kernel is unmatched, a bias also used elsewhere, and a bias added to a dot
  output that is also used elsewhere (the bias gradient is then not the sum of that layer's
  output cotangent).

Example:

  >>> import jax, jax.numpy as jnp
  >>> from hfjax import layers
  >>> params = [{"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, {"w": jnp.ones((4, 2))}]
  >>> def apply_fn(params, x):
  ...   h = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
  ...   return h @ params[1]["w"]
  >>> layout = layers.find_dense_layers(apply_fn, params, jnp.ones((5, 3)))
  >>> [(layer.kernel, layer.bias, layer.kernel_in_axis) for layer in layout.layers]
  [(1, 0, 0), (2, None, 0)]
  >>> outputs, activations, backward = layers.layer_statistics(
  ...   apply_fn, params, jnp.ones((5, 3)), layout)
  >>> [a.shape for a in activations], [g.shape for g in backward(jnp.ones((5, 2)))]
  ([(5, 3), (5, 4)], [(5, 4), (5, 2)])
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex


class DenseLayer(NamedTuple):
  """A dense layer ``y = a W + b`` of an ``apply_fn``, by the parameter leaves it uses.

  Attributes:
    kernel: index of the kernel leaf in ``jax.tree.leaves(params)``.
    bias: index of the bias leaf added to this layer's output, or ``None``.
    kernel_in_axis: the kernel axis contracted with the input: 0 for ``x @ W``, 1 for
      ``x @ W.T`` (the kernel is then stored ``(d_out, d_in)``).
    path: ``jax.tree_util.keystr`` of the kernel leaf, for messages.
  """

  kernel: int
  bias: int | None
  kernel_in_axis: int
  path: str


class LayerLayout(NamedTuple):
  """The dense layers of an ``apply_fn`` and the parameter leaves outside them.

  Static and hashable (tuples of ints and strings), so it can be jit static data.

  Attributes:
    layers: the dense layers, in the order the forward pass reaches them.
    unmatched: indices of the leaves of ``jax.tree.leaves(params)`` in no dense layer, for a
      diagonal fallback, in increasing order.
    reasons: one human-readable reason per ``unmatched`` leaf, in the same order.
  """

  layers: tuple[DenseLayer, ...]
  unmatched: tuple[int, ...]
  reasons: tuple[str, ...]


# Call-like equations: a body called once on the equation's operands, returning its results,
# and the parameter holding it. A layer inside one is found, and captured by evaluating the
# body in place of the call.
_CALL_BODIES = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "remat2": "jaxpr",
  "checkpoint": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Equations that pass a value through unchanged but for its dtype.
_CASTS = frozenset({"convert_element_type", "copy", "copy_p"})
# Equations that only move or repeat the elements of a value.
_RESHAPES = frozenset({"transpose", "broadcast_in_dim", "reshape", "squeeze"})


def _call_body(eqn: jex.JaxprEqn) -> tuple[jex.Jaxpr, Sequence[Any]] | None:
  """The body and constants of a call-like equation, or ``None`` for any other."""
  key = _CALL_BODIES.get(eqn.primitive.name)
  body = eqn.params.get(key) if key else None
  if isinstance(body, jex.ClosedJaxpr):
    jaxpr, consts = body.jaxpr, body.consts
  elif isinstance(body, jex.Jaxpr):
    jaxpr, consts = body, ()
  else:
    return None
  if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
    return None
  return jaxpr, consts


# What a jaxpr variable is, as far as the matcher cares: a view of a parameter leaf (cast,
# transposed or broadcast, never combined with anything else), or the output of a dense dot.


class _Kernel(NamedTuple):
  """A 2-D parameter leaf, possibly cast, transposed when ``transposed``."""

  leaf: int
  transposed: bool


class _Bias(NamedTuple):
  """A 1-D parameter leaf broadcast so that it varies along ``axis`` only (``None``: length 1)."""

  leaf: int
  axis: int | None


class _Leaf(NamedTuple):
  """Any other parameter leaf, or a parameter reshaped into no kernel or bias."""

  leaf: int


class _DotOutput(NamedTuple):
  """The output of dense dot number ``dot``, possibly cast."""

  dot: int


_ParamView = _Kernel | _Bias | _Leaf


class _Dot(NamedTuple):
  """A dense ``dot_general`` found in the jaxpr."""

  path: tuple[int, ...]  # equation indices from the outer jaxpr down through call bodies
  kernel: int
  kernel_in_axis: int
  input_operand: int  # 0 if the input is the dot's lhs, 1 if it is its rhs
  feature_axis: int  # the axis of the dot's output of size d_out
  out_aval: Any


class _Use(NamedTuple):
  """One use of a parameter leaf or of a dot's output."""

  kind: str  # "dense" (a leaf as a kernel), "bias" (a bias add), or "other"
  what: str  # for messages
  dot: int | None = None  # the dot, for a leaf's dense or bias use
  leaf: int | None = None  # the bias leaf, for a dot output's bias use


class _Analysis:
  """The dense dots of a jaxpr and every use of each parameter leaf and dot output."""

  def __init__(self, num_leaves: int):
    self.dots: list[_Dot] = []
    self.leaf_uses: list[list[_Use]] = [[] for _ in range(num_leaves)]
    self.dot_uses: list[list[_Use]] = []

  def use(self, origin: Any, use: _Use) -> None:
    if isinstance(origin, _DotOutput):
      self.dot_uses[origin.dot].append(use)
    elif origin is not None:
      self.leaf_uses[origin.leaf].append(use)

  def run(self, jaxpr: jex.Jaxpr, origins: Sequence[Any], prefix: tuple[int, ...]) -> list:
    """Walks ``jaxpr`` given what its inputs are; returns what its outputs are."""
    env = {v: o for v, o in zip(jaxpr.invars, origins, strict=True) if o is not None}
    read = lambda v: None if isinstance(v, jex.Literal) else env.get(v)
    for i, eqn in enumerate(jaxpr.eqns):
      ins = [read(v) for v in eqn.invars]
      if all(o is None for o in ins):
        continue
      for v, o in zip(eqn.outvars, self._equation(eqn, ins, prefix + (i,)), strict=True):
        if o is not None:
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def _equation(self, eqn: jex.JaxprEqn, ins: list, path: tuple[int, ...]) -> list:
    name = eqn.primitive.name
    body = _call_body(eqn)
    if body is not None:
      return self.run(body[0], ins, path)
    if name in _CASTS:
      return [ins[0]]
    if name in _RESHAPES and len(ins) == 1 and isinstance(ins[0], _ParamView):
      return [_reshaped(eqn, ins[0])]
    what = name
    if name == "dot_general":
      found = self._dot(eqn, ins, path)
      if isinstance(found, str):
        what = found
      else:
        return found
    if name == "add" and self._bias_add(eqn, ins):
      return [None]
    for o in ins:
      self.use(o, _Use("other", what))
    return [None] * len(eqn.outvars)

  def _dot(self, eqn: jex.JaxprEqn, ins: list, path: tuple[int, ...]) -> list | str:
    """Records a dense dot and returns what its output is, or says why it is not one."""
    is_param = [isinstance(o, _ParamView) for o in ins]
    if not any(is_param):
      return "dot_general of two layer outputs"
    if all(is_param):
      return "dot_general of two parameters"
    if not isinstance(ins[is_param.index(True)], _Kernel):
      return "dot_general with a parameter that is not a 2-D kernel"
    k = is_param.index(True)
    kernel, x_aval, out_aval = ins[k], eqn.invars[1 - k].aval, eqn.outvars[0].aval
    (contracting, batch) = eqn.params["dimension_numbers"]
    kernel_axes, x_axes = tuple(contracting[k]), tuple(contracting[1 - k])
    if batch[0] or batch[1] or len(kernel_axes) != 1 or x_axes != (x_aval.ndim - 1,):
      return (
        f"dot_general contracting kernel axes {kernel_axes} with axes {x_axes} of a "
        f"{x_aval.ndim}-D input (a dense layer contracts one kernel axis with the input's "
        "last axis)"
      )
    if not jnp.issubdtype(out_aval.dtype, jnp.inexact):
      return f"dot_general with a {out_aval.dtype} output"
    d = len(self.dots)
    # dot_general's output axes are the lhs's free axes, then the rhs's.
    self.dots.append(
      _Dot(
        path=path,
        kernel=kernel.leaf,
        kernel_in_axis=kernel_axes[0] if not kernel.transposed else 1 - kernel_axes[0],
        input_operand=1 - k,
        feature_axis=x_aval.ndim - 1 if k == 1 else 0,
        out_aval=out_aval,
      )
    )
    self.dot_uses.append([])
    self.use(kernel, _Use("dense", "a dense dot_general", dot=d))
    self.use(ins[1 - k], _Use("other", "the input of a dense layer"))
    return [_DotOutput(d)]

  def _bias_add(self, eqn: jex.JaxprEqn, ins: list) -> bool:
    """Records ``dot_output + bias``; whether the equation is one."""
    kinds = [type(o) for o in ins]
    if sorted(kinds, key=lambda t: t.__name__) != [_Bias, _DotOutput]:
      return False
    j = kinds.index(_DotOutput)
    dot_output, bias = ins[j], ins[1 - j]
    dot_shape = eqn.invars[j].aval.shape
    feature_axis = self.dots[dot_output.dot].feature_axis
    # A bias of length d_out varies along the dot's feature axis only and does not broadcast
    # the dot's output to a larger shape; a length-1 bias fits only a one-unit layer.
    along = bias.axis == feature_axis if bias.axis is not None else dot_shape[feature_axis] == 1
    if not along or eqn.outvars[0].aval.shape != dot_shape:
      return False
    self.use(bias, _Use("bias", "a bias add", dot=dot_output.dot))
    self.use(dot_output, _Use("bias", "a bias add", leaf=bias.leaf))
    return True


def _reshaped(eqn: jex.JaxprEqn, param: _ParamView) -> _ParamView:
  """What a transpose, broadcast, reshape or squeeze of a parameter view is.

  A transposed kernel is still a kernel and a broadcast bias still a bias; anything else is
  only followed to name the operation that uses it in messages.
  """
  if isinstance(param, _Kernel) and eqn.primitive.name == "transpose":
    flip = tuple(eqn.params["permutation"]) == (1, 0)
    return param._replace(transposed=param.transposed != flip)
  if isinstance(param, _Bias):
    view = _bias_view(eqn, param)
    if view is not None:
      return view
  return _Leaf(param.leaf)


def _bias_view(eqn: jex.JaxprEqn, bias: _Bias) -> _Bias | None:
  """What a transpose, broadcast, reshape or squeeze of a bias is; ``None`` if no bias."""
  name, axis = eqn.primitive.name, bias.axis
  if axis is None:  # a length-1 bias stays constant whatever its shape
    return bias
  if name == "transpose":
    return bias._replace(axis=tuple(eqn.params["permutation"]).index(axis))
  if name == "broadcast_in_dim":
    return bias._replace(axis=eqn.params["broadcast_dimensions"][axis])
  if name == "squeeze":
    return bias._replace(axis=axis - sum(d < axis for d in eqn.params["dimensions"]))
  old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  size = old[axis]
  # A reshape keeps a bias if the bias's axis is the only one of size other than 1.
  if math.prod(old) == size and new.count(size) == 1 and math.prod(new) == size:
    return bias._replace(axis=new.index(size))
  return None


class _Traced(NamedTuple):
  """``apply_fn`` as a jaxpr, with what the matcher found in it."""

  jaxpr: jex.ClosedJaxpr
  out_tree: Any
  analysis: _Analysis
  layout: LayerLayout
  dots: dict[int, int]  # kernel leaf -> dot number, for the layers of `layout`


def _trace(apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> _Traced:
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = tuple(jax.tree_util.keystr(path) for path, _ in path_leaves)
  closed, out_shapes = jax.make_jaxpr(lambda p, x: apply_fn(p, x), return_shape=True)(
    params, inputs
  )
  analysis = _Analysis(len(paths))
  origins = []
  for i, (_, leaf) in enumerate(path_leaves):
    ndim = len(jnp.shape(leaf))
    if ndim == 2:
      origins.append(_Kernel(i, transposed=False))
    elif ndim == 1:
      origins.append(_Bias(i, axis=0 if jnp.shape(leaf)[0] != 1 else None))
    else:
      origins.append(_Leaf(i))
  num_inputs = len(closed.jaxpr.invars) - len(paths)
  outputs = analysis.run(closed.jaxpr, origins + [None] * num_inputs, ())
  for o in outputs:
    analysis.use(o, _Use("other", "the outputs of apply_fn"))
  layout, dots = _layout(analysis, paths)
  return _Traced(closed, jax.tree.structure(out_shapes), analysis, layout, dots)


def _layout(analysis: _Analysis, paths: Sequence[str]) -> tuple[LayerLayout, dict[int, int]]:
  """The layers and unmatched leaves that ``analysis`` found."""
  layers, dots = [], {}
  for d, dot in enumerate(analysis.dots):
    if len(analysis.leaf_uses[dot.kernel]) != 1:
      continue
    bias = None
    dot_uses = analysis.dot_uses[d]
    if len(dot_uses) == 1 and dot_uses[0].kind == "bias":
      candidate = dot_uses[0].leaf
      if len(analysis.leaf_uses[candidate]) == 1:
        bias = candidate
    layers.append(DenseLayer(dot.kernel, bias, dot.kernel_in_axis, paths[dot.kernel]))
    dots[dot.kernel] = d
  matched = {layer.kernel for layer in layers} | {layer.bias for layer in layers}
  unmatched = tuple(i for i in range(len(paths)) if i not in matched)
  reasons = tuple(f"{paths[i]}: {_reason(analysis, paths, i)}" for i in unmatched)
  return LayerLayout(tuple(layers), unmatched, reasons), dots


def _describe(uses: Sequence[_Use]) -> str:
  counts = collections.Counter(use.what for use in uses)
  return ", ".join(what if n == 1 else f"{n} x {what}" for what, n in counts.items())


def _reason(analysis: _Analysis, paths: Sequence[str], leaf: int) -> str:
  """Why ``leaf`` is in no dense layer."""
  uses = analysis.leaf_uses[leaf]
  dense = [use for use in uses if use.kind == "dense"]
  others = [use for use in uses if use.kind != "dense"]
  if not uses:
    return "not used by apply_fn"
  if len(dense) > 1:
    also = f", and used by {_describe(others)}" if others else ""
    return (
      f"shared by {len(dense)} dense layers{also} (tied weights: the curvature block is a "
      "sum of Kronecker products, one per use, not one Kronecker product)"
    )
  if dense:
    return (
      f"the kernel of a dense layer but also used by {_describe(others)}, so its curvature "
      "block is not one Kronecker product"
    )
  if len(uses) == 1 and uses[0].kind == "bias":
    dot = uses[0].dot
    kernel = analysis.dots[dot].kernel
    if len(analysis.leaf_uses[kernel]) != 1:
      return f"the bias of {paths[kernel]}, whose kernel is unmatched"
    elsewhere = [use for use in analysis.dot_uses[dot] if use.leaf != leaf]
    return (
      f"the bias of {paths[kernel]}, whose output is also used by {_describe(elsewhere)}, "
      "so the bias gradient is not the sum of that layer's output cotangent"
    )
  return f"not in a dense layer: used by {_describe(uses)}"


def find_dense_layers(apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> LayerLayout:
  """Finds the dense layers of ``apply_fn`` by tracing it to a jaxpr.

  See the module docstring for what is matched and what falls back. Only shapes and dtypes
  are used, so ``params`` and ``inputs`` may be arrays, tracers (inside ``jit``) or
  ``jax.ShapeDtypeStruct``\\ s.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``, a pure function.
    params: the parameter pytree; leaves are numbered as in ``jax.tree.leaves(params)``.
    inputs: a batch of inputs (any pytree).

  Returns:
    A static, hashable :class:`LayerLayout`.

  Raises:
    TypeError: if ``apply_fn`` is not callable.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.LayerNorm(), nn.Dense(2)])
    >>> x = jax.ShapeDtypeStruct((8, 3), jnp.float32)
    >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    >>> layout = find_dense_layers(lambda p, x: model.apply({"params": p}, x), params, x)
    >>> [layer.path for layer in layout.layers]
    ["['layers_0']['kernel']", "['layers_3']['kernel']"]
    >>> layout.reasons[0]
    "['layers_2']['bias']: not in a dense layer: used by add"
  """
  return _trace(apply_fn, params, inputs).layout


class _Capture(NamedTuple):
  """Where :func:`_evaluate` captures layer inputs and perturbs dot outputs."""

  layers: dict[tuple[int, ...], int]  # path of a captured dot -> its layer number
  enclosing: frozenset[tuple[int, ...]]  # paths of the call equations around them
  dots: Sequence[_Dot]
  perturbations: Sequence[jax.Array]
  activations: list


def _evaluate(
  jaxpr: jex.Jaxpr,
  consts: Sequence[Any],
  args: Sequence[Any],
  prefix: tuple[int, ...],
  capture: _Capture,
) -> list:
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, capturing the dense layers."""
  env = dict(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
  for i, eqn in enumerate(jaxpr.eqns):
    path = prefix + (i,)
    invals = [read(v) for v in eqn.invars]
    if path in capture.enclosing:
      body, body_consts = _call_body(eqn)
      outvals = _evaluate(body, body_consts, invals, path, capture)
    else:
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = list(out) if eqn.primitive.multiple_results else [out]
      k = capture.layers.get(path)
      if k is not None:
        capture.activations[k] = invals[capture.dots[k].input_operand]
        outvals = [outvals[0] + capture.perturbations[k]]
    env.update(zip(eqn.outvars, outvals, strict=True))
  return [read(v) for v in jaxpr.outvars]


def layer_statistics(
  apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any, layout: LayerLayout
) -> tuple[Any, tuple[jax.Array, ...], Callable[[Any], tuple[jax.Array, ...]]]:
  """Runs ``apply_fn`` once, capturing each dense layer's input and output cotangent.

  Each layer's dot output is perturbed by an added zero, and ``backward`` is the ``jax.vjp``
  with respect to those perturbations: one forward pass now, one reverse pass per call of
  ``backward``, no per-example loops. Jittable; call it inside the caller's ``jit``.

  A layer inside a ``checkpoint`` or ``custom_vjp_call`` body is captured by evaluating that
  body directly, so there ``g`` is the derivative of the body itself (the custom rule or the
  rematerialisation is bypassed for that call; everything else runs as traced).

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``, as given to :func:`find_dense_layers`.
    params: the parameter pytree.
    inputs: a batch of inputs.
    layout: from :func:`find_dense_layers`, for these shapes or others; it may list a subset
      of the layers.

  Returns:
    ``(outputs, activations, backward)``: ``outputs`` equal to ``apply_fn(params, inputs)``;
    ``activations``, one per ``layout.layers`` entry, the layer input ``a`` of shape
    ``(*batch, d_in)`` (without a homogeneous 1 for the bias); ``backward(cotangents)``, for
    cotangents a pytree like ``outputs``, returns one ``g`` per layer, shape
    ``(*batch, d_out)``: the cotangent of the layer's output (equally of its dot and of the
    pre-activation after the bias add).

  Raises:
    TypeError: if ``layout`` is not a :class:`LayerLayout`.
    ValueError: if a layer of ``layout`` is not a dense layer of ``apply_fn``.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> params = {"w": jnp.eye(3)}
    >>> apply_fn = lambda p, x: jnp.sin(x @ p["w"])
    >>> x = jnp.ones((2, 3))
    >>> layout = find_dense_layers(apply_fn, params, x)
    >>> outputs, (a,), backward = layer_statistics(apply_fn, params, x, layout)
    >>> (g,) = backward(jnp.ones_like(outputs))
    >>> bool(jnp.allclose(g, jnp.cos(x @ params["w"])))
    True
  """
  if not isinstance(layout, LayerLayout):
    raise TypeError(f"layout must be a LayerLayout, got {type(layout).__name__}.")
  traced = _trace(apply_fn, params, inputs)
  found = {layer.kernel: layer for layer in traced.layout.layers}
  for layer in layout.layers:
    if found.get(layer.kernel) != layer:
      raise ValueError(
        f"layout layer {layer} is not a dense layer of apply_fn for these params and "
        f"inputs (found {found.get(layer.kernel)}); recompute it with find_dense_layers."
      )
  dots = [traced.analysis.dots[traced.dots[layer.kernel]] for layer in layout.layers]
  layers = {dot.path: k for k, dot in enumerate(dots)}
  enclosing = frozenset(dot.path[:j] for dot in dots for j in range(1, len(dot.path)))
  args = jax.tree.leaves((params, inputs))

  def forward(perturbations):
    capture = _Capture(layers, enclosing, dots, perturbations, [None] * len(dots))
    closed = traced.jaxpr
    outputs = _evaluate(closed.jaxpr, closed.consts, args, (), capture)
    return jax.tree.unflatten(traced.out_tree, outputs), tuple(capture.activations)

  zeros = tuple(jnp.zeros(dot.out_aval.shape, dot.out_aval.dtype) for dot in dots)
  outputs, vjp_fn, activations = jax.vjp(forward, zeros, has_aux=True)

  def backward(output_cotangents: Any) -> tuple[jax.Array, ...]:
    (cotangents,) = vjp_fn(output_cotangents)
    return tuple(
      jnp.moveaxis(g, dot.feature_axis, -1) for g, dot in zip(cotangents, dots, strict=True)
    )

  return outputs, activations, backward
