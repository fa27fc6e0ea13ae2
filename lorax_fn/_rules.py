"""Compute rules of ``lora(fn)``: primitives that consume a LoRA kernel, kept factored.

``dot_general(x, W)`` becomes ``dot_general(x, w) + s·((x·A)·B)`` for any contracting and
batch dimensions, ``conv_general_dilated`` a base conv plus a rank-``r`` conv and a 1×1 one,
and an embedding ``gather`` base rows plus ``A`` rows times ``B``; DoRA's column scale
multiplies the result. A quantised base is decoded inside a checkpoint with the matmul that
uses it (in row chunks where the kernel allows). The values are :mod:`lorax_fn._values`'s;
view rules (casts, transposes, reshapes, slices) are :mod:`lorax_fn._views`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn import _jaxpr
from lorax_fn._values import (
  Labels,
  LazyBase,
  LoraVal,
  NoRule,
  _transpose,
  arrange,
  base_call,
  place,
)

# Decode a quantised kernel in chunks of about this many elements (1 MiB of float32) so that
# one chunk, not the whole layer, is alive at a time, forward and backward.
CHUNK_ELEMENTS = 1 << 18


def _chunk_rows(q: Any) -> int | None:
  """Stored rows per chunk: whole blocks, even for 4-bit codes; None if one chunk."""
  total = q.shape[getattr(q, "row_axis", 0)]
  row = math.prod(q.shape) // max(total, 1)
  fits = [
    r
    for r in range(1, total)
    if total % r == 0
    and r * row <= CHUNK_ELEMENTS
    and (r * row) % q.block_size == 0
    and (q.kind == "int8" or (r * row) % 2 == 0)
  ]
  return max(fits) if fits else None


def chunked_dot(
  eqn: Any, x: jax.Array, w: LazyBase, wc: Sequence[int], xc: Sequence[int], wb: Sequence[int]
) -> jax.Array | None:
  """``dot_general(x, w)`` with the quantised kernel decoded chunk by chunk in a scan.

  Each chunk is decoded inside a checkpointed scan body, so the backward pass decodes it
  again instead of keeping every layer's float copy alive. None when not applicable.
  """
  k = w.row_axis  # the kernel axis chunks run along: its stored rows are contiguous codes
  rows = _chunk_rows(w.q) if w.elementwise and k not in wb else None
  if rows is None:
    return None
  chunks = w.q.shape[k] // rows
  out = eqn.outvars[0].aval
  if k in wc:  # a contracted axis: partial products add up
    xa = xc[list(wc).index(k)]

    def add(acc, c):
      xs = lax.dynamic_slice_in_dim(x, c * rows, rows, axis=xa)
      return acc + _bind(eqn, xs, w.decode_rows(c * rows, rows)), None

    y, _ = lax.scan(jax.checkpoint(add), jnp.zeros(out.shape, out.dtype), jnp.arange(chunks))
    return y
  free_w = [i for i in range(w.ndim) if i not in wc and i not in wb]
  pos = len(wb) + (x.ndim - len(xc) - len(wb)) + free_w.index(k)

  def part(_, c):
    return None, _bind(eqn, x, w.decode_rows(c * rows, rows))

  _, ys = lax.scan(jax.checkpoint(part), None, jnp.arange(chunks))
  ys = jnp.moveaxis(ys, 0, pos)
  return ys.reshape(*ys.shape[:pos], chunks * rows, *ys.shape[pos + 2 :])


def dora_output(
  base: jax.Array, lowrank: jax.Array, g: jax.Array, base_dropped: jax.Array | None = None
) -> jax.Array:
  """DoRA's output ``g ⊙ (W·x + s·B·A·x)``, as PEFT computes it.

  With dropout (``base_dropped`` is ``W·dropout(x)``), PEFT's
  ``W·x + (g - 1) ⊙ W·dropout(x) + g ⊙ s·B·A·dropout(x)``. Summed in float32 (or wider).
  """
  compute = jnp.promote_types(base.dtype, g.dtype)
  g = g.astype(compute)
  if base_dropped is None:
    out = g * (base.astype(compute) + lowrank.astype(compute))
  else:
    extra = (g - 1) * base_dropped.astype(compute) + g * lowrank.astype(compute)
    out = base.astype(compute) + extra
  return out.astype(base.dtype)


# ----------------------------------------------------------------------------------------
# Contraction helper: two operands, labelled axes, 2-D matmuls where there are no batch axes.
# ----------------------------------------------------------------------------------------


def contract(
  x: jax.Array, xl: Labels, y: jax.Array, yl: Labels, keep: Sequence[Any], precision: Any = None
) -> tuple[jax.Array, Labels]:
  """``einsum`` of two labelled operands, summing shared labels that are not in ``keep``.

  Without batch labels both operands are flattened to 2-D first: on XLA:CPU a skinny
  matmul on 3-D activations is several times slower than the same on 2-D (DESIGN.md §3).
  """
  x, xl = _sum_unshared(x, xl, yl, keep)
  y, yl = _sum_unshared(y, yl, xl, keep)
  shared = [l for l in xl if l in yl]
  batch = [l for l in shared if l in keep]
  summed = [l for l in shared if l not in keep]
  xf = [l for l in xl if l not in yl]
  yf = [l for l in yl if l not in xl]
  if batch:
    dims = (
      ([xl.index(l) for l in summed], [yl.index(l) for l in summed]),
      ([xl.index(l) for l in batch], [yl.index(l) for l in batch]),
    )
    return lax.dot_general(x, y, dims, precision=precision), tuple(batch + xf + yf)
  xs = [x.shape[xl.index(l)] for l in xf]
  ys = [y.shape[yl.index(l)] for l in yf]
  k = math.prod(x.shape[xl.index(l)] for l in summed)
  x2 = _transpose(x, xl, xf + summed).reshape(math.prod(xs), k)
  y2 = _transpose(y, yl, summed + yf).reshape(k, math.prod(ys))
  z = lax.dot(x2, y2, precision=precision)
  return z.reshape(xs + ys), tuple(xf + yf)


def _sum_unshared(x, xl, other, keep):
  drop = [i for i, l in enumerate(xl) if l not in other and l not in keep]
  if not drop:
    return x, tuple(xl)
  return x.sum(axis=tuple(drop)), tuple(l for i, l in enumerate(xl) if i not in drop)


def _bind(eqn: Any, *args: Any) -> Any:
  return _jaxpr.rebind(eqn, *args)


# ----------------------------------------------------------------------------------------
# Compute rules: the result is an ordinary array.
# ----------------------------------------------------------------------------------------

Dropout = Callable[[jax.Array, float], jax.Array]


def _compute_dtype(x: jax.Array, v: LoraVal) -> Any:
  return jnp.promote_types(x.dtype, v.a.dtype)


@dataclasses.dataclass(frozen=True)
class FirstStep:
  """``x·Aᵀ`` of one LoRA ``dot_general``, in a form that sites sharing ``x`` can batch."""

  x_pos: int  # which operand of the dot_general is x
  x_dims: tuple[int, ...]  # x's contracting dims, in order
  a2: jax.Array  # A as (rank, K), K ordered like x_dims
  dtype: Any
  precision: Any


def first_step_plan(eqn: Any, lhs: Any, rhs: Any) -> FirstStep | None:
  """The shareable first step of a LoRA ``dot_general``, or None if it has none.

  It has one when every axis of A except the rank is contracted with ``x``, no contracted
  axis is also in B (a contracted stack axis must be summed after the product with B) and
  there are no batch dimensions: then ``x·Aᵀ`` of several kernels that read the same ``x``
  (the q, k and v projections) is one matmul against their stacked A's, reading ``x`` once.
  """
  if isinstance(lhs, LoraVal) == isinstance(rhs, LoraVal):
    return None
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  w_is_lhs = isinstance(lhs, LoraVal)
  v, x = (lhs, rhs) if w_is_lhs else (rhs, lhs)
  wc, xc, wb = (lc, rc, lb) if w_is_lhs else (rc, lc, rb)
  a_lab, b_lab = v.labels()
  if wb or set(a_lab) != set(wc) | {"r"} or set(wc) & set(b_lab) or set(wc) & set(v.g_axes):
    return None
  a2 = arrange(v.a, a_lab, ["r", *wc]).reshape(v.a.shape[a_lab.index("r")], -1)
  return FirstStep(
    1 if w_is_lhs else 0, tuple(xc), a2, _compute_dtype(x, v), eqn.params.get("precision")
  )


def shared_first_steps(x: jax.Array, plans: Sequence[FirstStep]) -> list[tuple[jax.Array, Labels]]:
  """``x·Aᵢᵀ`` for several sites at once: one matmul against the stacked ``Aᵢ``."""
  p0 = plans[0]
  free = [i for i in range(x.ndim) if i not in p0.x_dims]
  k = math.prod(x.shape[i] for i in p0.x_dims)
  x2 = _transpose(x, range(x.ndim), free + list(p0.x_dims)).reshape(-1, k).astype(p0.dtype)
  a_all = jnp.concatenate([p.a2.astype(p0.dtype) for p in plans], axis=0)
  t_all = lax.dot_general(x2, a_all, (((1,), (1,)), ((), ())), precision=p0.precision)
  splits = list(itertools.accumulate(p.a2.shape[0] for p in plans))[:-1]
  free_shape = [x.shape[i] for i in free]
  labels = tuple(("x", i) for i in free) + ("r",)
  return [(t.reshape(*free_shape, -1), labels) for t in jnp.split(t_all, splits, axis=1)]


def dot_general_rule(
  eqn: Any, lhs: Any, rhs: Any, dropout: Dropout, first: tuple[jax.Array, Labels] | None = None
) -> jax.Array:
  """``dot_general(x, W)`` → ``dot_general(x, w) + s·((x·A)·B)``, any contracting/batch dims.

  ``first`` is ``x·Aᵀ`` when :func:`shared_first_steps` already computed it.
  """
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  w_is_lhs = isinstance(lhs, LoraVal)
  v, x = (lhs, rhs) if w_is_lhs else (rhs, lhs)
  wc, xc, wb, xb = (lc, rc, lb, rb) if w_is_lhs else (rc, lc, rb, lb)
  a_lab, b_lab = v.labels()
  contracted = set(wc)
  first_a = contracted <= set(a_lab)
  if not first_a and not contracted <= set(b_lab):
    raise NoRule  # contracts "in" and "out" axes together
  if contracted & set(v.g_axes):
    raise NoRule  # DoRA's scale on a contracted axis (W used transposed): materialise

  def base_of(x: jax.Array) -> jax.Array:
    if w_is_lhs:
      return base_call(v.w, lambda w, x: _bind(eqn, w, x), x)
    out = chunked_dot(eqn, x, v.w, wc, xc, wb) if isinstance(v.w, LazyBase) else None
    return base_call(v.w, lambda w, x: _bind(eqn, x, w), x) if out is None else out

  base = base_of(x)
  # Label x's axes: contracted and batch axes take the kernel's labels.
  partner = dict(zip(xc, wc, strict=True)) | dict(zip(xb, wb, strict=True))
  x_lab = tuple(partner.get(i, ("x", i)) for i in range(x.ndim))
  x_free = [l for i, l in enumerate(x_lab) if i not in partner]
  w_free = [i for i in range(v.ndim) if i not in contracted and i not in set(wb)]
  out_lab = list(wb) + (w_free + x_free if w_is_lhs else x_free + w_free)
  f1, l1, f2, l2 = (v.a, a_lab, v.b, b_lab) if first_a else (v.b, b_lab, v.a, a_lab)
  dtype = _compute_dtype(x, v)
  precision = eqn.params.get("precision")
  xd = x
  if first is not None:
    t, t_lab = first
  else:
    xd = dropout(x, v.dropout)
    t, t_lab = contract(
      xd.astype(dtype), x_lab, f1.astype(dtype), l1, set(out_lab) | set(l2), precision
    )
  t = t if v.scale == 1.0 else t * jnp.asarray(v.scale, t.dtype)
  y, y_lab = contract(t, t_lab, f2.astype(dtype), l2, set(out_lab), precision)
  y = arrange(y, y_lab, out_lab)
  if v.g is None:
    return base + y.astype(base.dtype)
  g = place(v.g, v.g_axes, out_lab)
  return dora_output(base, y, g, None if xd is x else base_of(xd))


def conv_rule(eqn: Any, lhs: Any, rhs: Any, dropout: Dropout) -> jax.Array:
  """Base conv plus an ``r``-filter conv with A followed by a 1x1 conv with B (as PEFT)."""
  if isinstance(lhs, LoraVal) or not isinstance(rhs, LoraVal):
    raise NoRule
  p = eqn.params
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise NoRule
  dn = p["dimension_numbers"]
  v, x = rhs, lhs
  out_feat = dn.rhs_spec[0]
  a_lab, b_lab = v.labels()
  if set(b_lab) != {"r", out_feat} or set(a_lab) != set(range(v.ndim)) - {out_feat} | {"r"}:
    raise NoRule
  if v.g is not None and tuple(v.g_axes) != (out_feat,):
    raise NoRule
  base_of = lambda x: base_call(v.w, lambda w, x: _bind(eqn, x, w), x)
  base = base_of(x)
  dtype = _compute_dtype(x, v)
  order = ["r" if i == out_feat else i for i in range(v.ndim)]
  a_kernel = arrange(v.a.astype(dtype), a_lab, order)
  xd = dropout(x, v.dropout)
  t = _jaxpr.rebind(eqn, xd.astype(dtype), a_kernel, preferred_element_type=None)
  t = t if v.scale == 1.0 else t * jnp.asarray(v.scale, t.dtype)
  feat = dn.out_spec[1]
  t_lab = tuple("r" if i == feat else ("t", i) for i in range(t.ndim))
  out_lab = tuple(out_feat if i == feat else ("t", i) for i in range(t.ndim))
  y, y_lab = contract(t, t_lab, v.b.astype(dtype), b_lab, set(out_lab), p.get("precision"))
  y = arrange(y, y_lab, out_lab)
  if v.g is None:
    return base + y.astype(base.dtype)
  g = place(v.g, v.g_axes, out_lab)
  return dora_output(base, y, g, None if xd is x else base_of(xd))


def gather_rule(eqn: Any, operand: Any, indices: Any, dropout: Dropout) -> jax.Array:
  """Embedding lookup: base rows plus the gathered rows of A times B."""
  del dropout  # as in PEFT, embedding LoRA has no dropout
  if not isinstance(operand, LoraVal) or isinstance(indices, LoraVal):
    raise NoRule
  v, p = operand, eqn.params
  dn = p["dimension_numbers"]
  a_lab, b_lab = v.labels()
  outs = [l for l in b_lab if l != "r"]
  if (
    dn.operand_batching_dims
    or len(outs) != 1
    or set(a_lab) - {"r"} != set(dn.collapsed_slice_dims)
    or p["slice_sizes"][outs[0]] != v.shape[outs[0]]
    or (v.g is not None and tuple(v.g_axes) != (outs[0],))
  ):
    raise NoRule
  out_ax = outs[0]
  base = base_call(v.w, lambda w, i: _bind(eqn, w, i), indices)
  order = ["r" if i == out_ax else i for i in range(v.ndim)]
  a_table = arrange(v.a, a_lab, order)
  sizes = tuple(
    v.a.shape[a_lab.index("r")] if i == out_ax else s for i, s in enumerate(p["slice_sizes"])
  )
  rows = _jaxpr.rebind(eqn, a_table, indices, slice_sizes=sizes)
  (off,) = dn.offset_dims
  r_lab = tuple("r" if i == off else ("g", i) for i in range(rows.ndim))
  out_lab = tuple(out_ax if i == off else ("g", i) for i in range(rows.ndim))
  rows = rows if v.scale == 1.0 else rows * jnp.asarray(v.scale, rows.dtype)
  y, y_lab = contract(rows, r_lab, v.b.astype(rows.dtype), b_lab, set(out_lab))
  y = arrange(y, y_lab, out_lab)
  if v.g is None:
    return base + y.astype(base.dtype)
  return dora_output(base, y, place(v.g, v.g_axes, out_lab))


COMPUTE_RULES: dict[str, Callable[..., jax.Array]] = {
  "dot_general": dot_general_rule,
  "conv_general_dilated": conv_rule,
  "gather": gather_rule,
}
