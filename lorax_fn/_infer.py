"""``infer_layouts``: read each kernel's axis roles off how ``fn`` uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from lorax_fn import _jaxpr, _paths
from lorax_fn._leaves import Layout, is_adapter
from lorax_fn._quant import is_quant
from lorax_fn._views import _reshape_groups

# Each tracked value maps its axes to the parameter axes they stand for.
AxisMap = tuple[tuple[int, ...], ...]
_PASS = (
  "convert_element_type",
  "copy",
  "sharding_constraint",
  "slice",
  "dynamic_slice",
  "optimization_barrier",
)


class _Recorder:
  def __init__(self, paths: list[str], ndims: list[int]):
    self.paths, self.ndims = paths, ndims
    self.roles: dict[int, dict[int, str]] = {}

  def record(self, pid: int, axis_map: AxisMap, roles: list[str]) -> None:
    new: dict[int, str] = {}
    for axes, role in zip(axis_map, roles, strict=True):
      for ax in axes:
        new[ax] = role
    old = self.roles.setdefault(pid, {})
    clash = {ax for ax in new if ax in old and old[ax] != new[ax]}
    swapped = {"in": "out", "out": "in", "stack": "stack"}
    if clash and all(old.get(ax) == swapped[r] for ax, r in new.items() if ax in old):
      return  # used transposed (a tied embedding's ``attend``): the same factorisation
    if clash:
      raise ValueError(
        f"the kernel at {self.paths[pid]!r} is used with conflicting axis roles "
        f"{_fmt(old, self.ndims[pid])} and {_fmt(new, self.ndims[pid])}; pass its layout "
        "explicitly with layouts=."
      )
    old.update(new)


def _fmt(roles: dict[int, str], ndim: int) -> tuple[str, ...]:
  return tuple(roles.get(i, "?") for i in range(ndim))


def _walk(jaxpr: Any, tracked: dict[Any, tuple[int, AxisMap]], rec: _Recorder) -> None:
  def get(v: Any) -> tuple[int, AxisMap] | None:
    return None if _jaxpr.is_literal(v) else tracked.get(v)

  for eqn in jaxpr.eqns:
    ins = [get(v) for v in eqn.invars]
    if not any(ins):
      continue
    name, p = _jaxpr.name(eqn), eqn.params
    first = ins[0]
    if name in _PASS and first:
      tracked[eqn.outvars[0]] = first
    elif name == "transpose" and first:
      tracked[eqn.outvars[0]] = (first[0], tuple(first[1][i] for i in p["permutation"]))
    elif name == "broadcast_in_dim" and first:
      new_map = [()] * len(eqn.outvars[0].aval.shape)
      for old, new in enumerate(p["broadcast_dimensions"]):
        new_map[new] = first[1][old]
      tracked[eqn.outvars[0]] = (first[0], tuple(new_map))
    elif name == "squeeze" and first:
      kept = [m for i, m in enumerate(first[1]) if i not in p["dimensions"]]
      tracked[eqn.outvars[0]] = (first[0], tuple(kept))
    elif name == "reshape" and first:
      old_shape, new_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      new_map: list[tuple[int, ...]] = [()] * len(new_shape)
      for gi, gj in _reshape_groups(old_shape, new_shape):
        axes = tuple(ax for i in gi for ax in first[1][i])
        for j in gj:
          new_map[j] = axes
      tracked[eqn.outvars[0]] = (first[0], tuple(new_map))
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      for t, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
        if t:
          n = len(t[1])
          rec.record(
            t[0], t[1], ["in" if i in c else "stack" if i in b else "out" for i in range(n)]
          )
    elif name == "conv_general_dilated" and ins[1]:
      out_feat = p["dimension_numbers"].rhs_spec[0]
      rec.record(
        ins[1][0], ins[1][1], ["out" if i == out_feat else "in" for i in range(len(ins[1][1]))]
      )
    elif name == "gather" and first:
      collapsed = p["dimension_numbers"].collapsed_slice_dims
      rec.record(
        first[0], first[1], ["in" if i in collapsed else "out" for i in range(len(first[1]))]
      )
    elif name in _jaxpr.CALLS or name in _jaxpr.CUSTOM_CALLS:
      outs = _walk_sub(_jaxpr.call_body(eqn).jaxpr, ins, rec)
      tracked.update(_follow(eqn.outvars, outs))
    elif name == _jaxpr.REMAT:
      outs = _walk_sub(_jaxpr.remat_params(eqn).jaxpr, ins, rec)
      tracked.update(_follow(eqn.outvars, outs))
    elif name == _jaxpr.COND:
      for br in _jaxpr.cond_branches(eqn):
        outs = _walk_sub(br.jaxpr, ins[1:], rec)
      tracked.update(_follow(eqn.outvars, outs))  # a kernel passed through: the same in each
    elif name == _jaxpr.WHILE:
      w = _jaxpr.while_params(eqn)
      consts = ins[w.cond_nconsts : w.cond_nconsts + w.body_nconsts]
      carry = [None] * (len(ins) - w.cond_nconsts - w.body_nconsts)  # a kernel carried along
      _walk_sub(w.body.jaxpr, [*consts, *carry], rec)
    elif name == _jaxpr.SCAN:
      sp = _jaxpr.scan_params(eqn)
      nc, ncar = sp.num_consts, sp.num_carry
      body_ins = list(ins[:nc]) + [None] * ncar
      for t in ins[nc + ncar :]:
        if t:
          rec.record(t[0], t[1][:1], ["stack"])
          t = (t[0], t[1][1:])
        body_ins.append(t)
      _walk_sub(sp.body.jaxpr, body_ins, rec)


def _walk_sub(jaxpr: Any, ins: list[Any], rec: _Recorder) -> list[Any]:
  """Walks a sub-jaxpr; returns what each of its outputs carries (``None``: no kernel)."""
  tracked = {v: t for v, t in zip(jaxpr.invars, ins, strict=True) if t}
  _walk(jaxpr, tracked, rec)
  return [None if _jaxpr.is_literal(v) else tracked.get(v) for v in jaxpr.outvars]


def _follow(outvars: list[Any], outs: list[Any]) -> dict[Any, Any]:
  """The call's outputs that carry a kernel (a kernel passed through ``jit``, a custom rule)."""
  return {v: t for v, t in zip(outvars, outs, strict=True) if t and not _jaxpr.is_dropped(v)}


def infer_layouts(
  fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> dict[str, Layout]:
  """Infers each kernel's layout by tracing ``fn(params, *args, **kwargs)`` once.

  How a kernel meets ``dot_general`` (contracted axes are ``in``, batch axes ``stack``,
  the rest ``out``), ``conv_general_dilated`` (the output-feature axis is ``out``),
  ``gather`` (looked-up axes are ``in``) or ``scan`` (a scanned-over axis is ``stack``)
  gives its roles, through casts, transposes, reshapes and nested ``jit``/``remat``/
  ``cond``/``while``. Only abstract shapes are traced; nothing is computed.

  Args:
    fn: the apply function, called as ``fn(params, *args, **kwargs)``.
    params: the (unwrapped) parameters; arrays or ``jax.ShapeDtypeStruct``.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: example keyword inputs.

  Returns:
    ``{path: layout}`` for every parameter with at least two axes whose roles were all
    determined; pass it to :func:`wrap` as ``layouts=``.

  Raises:
    ValueError: if a kernel is used with conflicting roles, or ``fn`` uses no parameter of
      2+ axes in a way that reveals its layout.
    TypeError: if ``fn`` is not callable.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> params = {"w": jnp.ones((3, 5, 7))}  # a stack of 3 (5, 7) layers
    >>> def fn(params, x):
    ...   return jax.lax.scan(lambda h, w: (h @ w @ w.T, None), x, params["w"])[0]
    >>> lora_fn.infer_layouts(fn, params, jnp.ones((2, 5)))
    {'w': ('stack', 'in', 'out')}
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable, e.g. model.apply; got: {fn!r}")
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: is_adapter(x) or is_quant(x)
  )
  paths = [_paths.path_str(p) for p, _ in flat]
  # A LoRA leaf or a stack of adapters is laid out as its base.
  leaves = [x.w if is_adapter(x) else x for _, x in flat]
  # Arrays (and their abstract stand-ins) are traced; other leaves (a step count, a name)
  # are passed through as they are.
  dyn = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]
  specs = [jax.ShapeDtypeStruct(tuple(leaves[i].shape), leaves[i].dtype) for i in dyn]

  def flat_fn(*arrays: Any) -> Any:
    full = list(leaves)
    for i, a in zip(dyn, arrays, strict=True):
      full[i] = a
    return fn(jax.tree_util.tree_unflatten(treedef, full), *args, **kwargs)

  closed = jax.make_jaxpr(flat_fn)(*specs)
  rec = _Recorder([paths[i] for i in dyn], [len(s.shape) for s in specs])
  tracked = {
    v: (j, tuple((ax,) for ax in range(len(specs[j].shape))))
    for j, v in enumerate(closed.jaxpr.invars[: len(specs)])
    if len(specs[j].shape) >= 2
  }
  if not tracked:
    raise ValueError(
      f"infer_layouts: params hold no array of 2+ axes, so there is no layout to infer; got "
      f"paths {paths[:8]}"
    )
  _walk(closed.jaxpr, tracked, rec)
  out = {}
  for pid, roles in rec.roles.items():
    layout = _fmt(roles, rec.ndims[pid])
    if "?" not in layout and "in" in layout and "out" in layout:
      out[rec.paths[pid]] = layout
  if not out:
    raise ValueError(
      "infer_layouts: fn used no parameter of 2+ axes in a matmul, convolution or lookup, so "
      "no layout could be read; check that fn reads the params it is given, as "
      "fn(params, *args)."
    )
  return out
