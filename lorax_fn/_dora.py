"""DoRA: the column norms ``‖W + s·BA‖`` that the magnitude ``m`` divides, without ``W + s·BA``.

A DoRA leaf stands for ``m / ‖W + s·BA‖ ⊙ (W + s·BA)``, the norm over the kernel's ``"in"``
axes (PEFT's row norms of its ``(out, in)`` weight), one per output unit and stacked layer.
The norm is expanded as ``‖W‖² + 2s·⟨W, BA⟩ + s²·‖BA‖²``: ``⟨W, BA⟩`` needs ``W·Aᵀ``
(``r × out`` per layer) and ``‖BA‖²`` the ``r × r`` Gram matrix ``A·Aᵀ``, so no temporary of
the kernel's size is formed beyond the (fused) square of ``W``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn._leaves import LoraLeaf, factor_axes
from lorax_fn._quant_leaf import QuantSlice

_HIGHEST = lax.Precision.HIGHEST  # the norms are cheap; keep them exact on TPU/GPU too


def magnitude_axes(roles: Sequence[str]) -> tuple[int, ...]:
  """The kernel axes ``m`` runs over: every axis but the ``"in"`` ones, in kernel order."""
  return tuple(i for i, r in enumerate(roles) if r != "in")


def dense_norm(
  w: jax.Array,
  a: jax.Array,
  a_axes: Sequence[int | None],
  b: jax.Array,
  b_axes: Sequence[int | None],
  scale: float,
) -> jax.Array:
  """``‖w + scale·B·A‖`` over the axes of ``w`` that ``b`` does not stand for, in float32.

  The result has ``w``'s other axes, in kernel order. A zero norm is returned as 1 (its
  column of ``W + s·BA`` is zero, and so is the DoRA weight's, whatever ``m``).
  """
  nd = w.ndim
  r, r2 = nd, nd + 1
  keep = sorted(i for i in b_axes if i is not None)
  ins = tuple(i for i in range(nd) if i not in keep)
  stack = [i for i in a_axes if i is not None and i in keep]
  a_lab = [r if i is None else i for i in a_axes]
  b_lab = [r if i is None else i for i in b_axes]
  a_lab2 = [r2 if i == r else i for i in a_lab]
  b_lab2 = [r2 if i == r else i for i in b_lab]
  compute = jnp.promote_types(jnp.promote_types(w.dtype, a.dtype), jnp.float32)
  w, a, b = w.astype(compute), a.astype(compute), b.astype(compute)
  ein = lambda *args: jnp.einsum(*args, precision=_HIGHEST)
  w2 = jnp.sum(jnp.square(w), axis=ins)
  wa = ein(w, list(range(nd)), a, a_lab, keep + [r])  # W·Aᵀ: (keep..., r)
  cross = ein(wa, keep + [r], b, b_lab, keep)
  gram = ein(a, a_lab, a, a_lab2, stack + [r, r2])  # A·Aᵀ per stacked layer
  ba2 = ein(ein(b, b_lab, gram, stack + [r, r2], keep + [r2]), keep + [r2], b, b_lab2, keep)
  norm = jnp.sqrt(jnp.maximum(w2 + 2 * scale * cross + scale**2 * ba2, 0))
  return jnp.where(norm > 0, norm, 1)


def weight_norm(leaf: LoraLeaf) -> jax.Array:
  """``‖W + s·BA‖`` of a leaf over its ``"in"`` axes (the shape of ``m``), in float32.

  A quantised base is decoded for this only; a stacked one layer by layer (``lax.map``), so
  a scanned QLoRA model never holds a float copy of the whole stack.
  """
  a_axes, b_axes = factor_axes(leaf.roles)
  w, a, b = leaf.w, leaf.a, leaf.b
  if not leaf.is_quantized:
    return dense_norm(lax.stop_gradient(w), a, a_axes, b, b_axes, leaf.scale)
  if leaf.roles[0] == "stack" and w.sliceable():
    drop = lambda axes: tuple(None if i is None else i - 1 for i in axes[1:])

    def layer(args: Any) -> jax.Array:
      i, ai, bi = args
      wi = lax.stop_gradient(QuantSlice(w, i).dequantize())
      return dense_norm(wi, ai, drop(a_axes), bi, drop(b_axes), leaf.scale)

    return lax.map(layer, (jnp.arange(w.shape[0]), a, b))
  return dense_norm(lax.stop_gradient(w.dequantize()), a, a_axes, b, b_axes, leaf.scale)


def column_scale(leaf: LoraLeaf) -> jax.Array:
  """``m / ‖W + s·BA‖`` with the norm detached from the gradient (as the paper and PEFT)."""
  norm = lax.stop_gradient(weight_norm(leaf))
  return leaf.m.astype(norm.dtype) / norm


def with_magnitude(leaf: LoraLeaf) -> LoraLeaf:
  """``leaf`` as a DoRA leaf whose ``m`` is ``‖W + s·BA‖``: it computes what ``leaf`` does."""
  # One compiled program per kernel shape, not one dispatch per operation (wrap runs eagerly).
  return dataclasses.replace(leaf, m=_initial_norm(leaf))


@jax.jit
def _initial_norm(leaf: LoraLeaf) -> jax.Array:
  return weight_norm(leaf).astype(leaf.a.dtype)
