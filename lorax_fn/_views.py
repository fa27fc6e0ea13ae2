"""View rules of ``lora(fn)``: casts, transposes, reshapes and slices of a LoRA kernel.

Each takes the equation and a :class:`~lorax_fn._values.LoraVal` and returns the view as a
``LoraVal`` again (its factors and DoRA scale relabelled, reshaped or sliced alike), or
raises :class:`~lorax_fn._values.NoRule` when the factors cannot follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn import _jaxpr
from lorax_fn._values import LoraVal, NoRule, dense, view_w


def _view(eqn: Any, w: Any) -> Any:
  return view_w(w, lambda w: _jaxpr.rebind(eqn, w), _jaxpr.name(eqn) == "convert_element_type")


def view_convert(eqn: Any, v: LoraVal) -> LoraVal:
  dtype = eqn.params["new_dtype"]
  if not jnp.issubdtype(dtype, jnp.floating):
    raise NoRule
  return dataclasses.replace(v, w=_view(eqn, v.w), a=v.a.astype(dtype), b=v.b.astype(dtype))


def view_transpose(eqn: Any, v: LoraVal) -> LoraVal:
  perm = eqn.params["permutation"]
  new_of_old = {old: new for new, old in enumerate(perm)}
  relabel = lambda axes: tuple(None if i is None else new_of_old[i] for i in axes)
  return dataclasses.replace(
    v,
    w=_view(eqn, v.w),
    a_axes=relabel(v.a_axes),
    b_axes=relabel(v.b_axes),
    g_axes=tuple(new_of_old[i] for i in v.g_axes),
  )


def view_identity(eqn: Any, v: LoraVal) -> LoraVal:
  return dataclasses.replace(v, w=_view(eqn, v.w))


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Pairs runs of old and new axes with equal sizes; size-1 axes form their own groups."""
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
      groups.append(([i], []))
      i += 1
      continue
    if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
      groups.append(([], [j]))
      j += 1
      continue
    gi, gj, pi, pj = [i], [j], old[i], new[j]
    i, j = i + 1, j + 1
    while pi != pj:
      if pi < pj:
        gi.append(i)
        pi *= old[i]
        i += 1
      else:
        gj.append(j)
        pj *= new[j]
        j += 1
    groups.append((gi, gj))
  return groups


def _reshape_factor(f, axes, groups, new_shape):
  """Applies the grouped reshape to one factor, or raises :class:`NoRule`."""
  group_of = {o: (gi, gj) for gi, gj in groups for o in gi}
  out_axes: list[int | None] = []
  out_shape: list[int] = []
  k = 0
  while k < len(axes):
    if axes[k] is None:
      out_axes.append(None)
      out_shape.append(f.shape[k])
      k += 1
      continue
    gi, gj = group_of[axes[k]]
    if list(axes[k : k + len(gi)]) != gi:
      raise NoRule  # the run mixes roles or is out of order in this factor
    out_axes += gj
    out_shape += [new_shape[j] for j in gj]
    k += len(gi)
  return f.reshape(out_shape), tuple(out_axes)


def _reshape_view(v: LoraVal, new_shape: Sequence[int], w: jax.Array) -> LoraVal:
  groups = _reshape_groups(v.shape, new_shape)
  a, a_axes = _reshape_factor(v.a, v.a_axes, groups, new_shape)
  b, b_axes = _reshape_factor(v.b, v.b_axes, groups, new_shape)
  for gi, gj in groups:
    if not gi:  # a new size-1 axis: let the output factor carry it
      b, b_axes = b[..., None], b_axes + (gj[0],)
  g, g_axes = v.g, v.g_axes
  if g is not None:
    g, g_axes = _reshape_factor(g, g_axes, groups, new_shape)
  return dataclasses.replace(v, w=w, a=a, b=b, a_axes=a_axes, b_axes=b_axes, g=g, g_axes=g_axes)


def view_reshape(eqn: Any, v: LoraVal) -> LoraVal:
  if eqn.params.get("dimensions") is not None:
    raise NoRule
  return _reshape_view(v, tuple(eqn.params["new_sizes"]), _view(eqn, v.w))


def view_squeeze(eqn: Any, v: LoraVal) -> LoraVal:
  dims = eqn.params["dimensions"]
  new_shape = [d for i, d in enumerate(v.shape) if i not in dims]
  return _reshape_view(v, new_shape, _view(eqn, v.w))


def view_expand(eqn: Any, v: LoraVal) -> LoraVal:
  shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  if (
    list(bdims) != sorted(bdims)
    or any(shape[j] != 1 for j in range(len(shape)) if j not in bdims)
    or any(shape[bdims[i]] != d for i, d in enumerate(v.shape))
  ):
    raise NoRule  # a real broadcast of the kernel
  return _reshape_view(v, shape, _view(eqn, v.w))


def _slice_factor(f, axes, ax, fn):
  if ax not in axes:
    return f
  return fn(f, axes.index(ax))


def view_slice(eqn: Any, v: LoraVal) -> LoraVal:
  start, limit, strides = (
    eqn.params["start_indices"],
    eqn.params["limit_indices"],
    eqn.params["strides"],
  )
  a, b, g = v.a, v.b, v.g
  for ax in range(v.ndim):
    if start[ax] == 0 and limit[ax] == v.shape[ax] and (strides is None or strides[ax] == 1):
      continue
    step = 1 if strides is None else strides[ax]
    cut = lambda f, i, ax=ax, step=step: lax.slice_in_dim(f, start[ax], limit[ax], step, i)
    a, b = _slice_factor(a, v.a_axes, ax, cut), _slice_factor(b, v.b_axes, ax, cut)
    g = None if g is None else _slice_factor(g, v.g_axes, ax, cut)
  return dataclasses.replace(v, w=_view(eqn, v.w), a=a, b=b, g=g)


def view_dynamic_slice(eqn: Any, v: LoraVal, *starts: Any) -> LoraVal:
  sizes = eqn.params["slice_sizes"]
  a, b, g = v.a, v.b, v.g
  for ax in range(v.ndim):
    if sizes[ax] == v.shape[ax]:
      continue
    cut = lambda f, i, ax=ax: lax.dynamic_slice_in_dim(f, starts[ax], sizes[ax], i)
    a, b = _slice_factor(a, v.a_axes, ax, cut), _slice_factor(b, v.b_axes, ax, cut)
    g = None if g is None else _slice_factor(g, v.g_axes, ax, cut)
  w = dense(v.w)  # traced start indices: decode here rather than inside a view closure
  return dataclasses.replace(v, w=_jaxpr.rebind(eqn, w, *starts), a=a, b=b, g=g)


VIEW_RULES: dict[str, Callable[..., LoraVal]] = {
  "convert_element_type": view_convert,
  "transpose": view_transpose,
  "reshape": view_reshape,
  "squeeze": view_squeeze,
  "broadcast_in_dim": view_expand,
  "slice": view_slice,
  "dynamic_slice": view_dynamic_slice,
  "copy": view_identity,
  "sharding_constraint": view_identity,
}
