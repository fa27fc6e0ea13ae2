"""The values ``lora(fn)``'s interpreter passes around for LoRA kernels.

A :class:`LoraVal` is the interpreter's view of a LoRA kernel after any casts, transposes,
reshapes or slices: the (stop-gradient) base ``w`` and the factors ``a`` and ``b``, each
factor axis labelled with the view axis it stands for (``None`` for the rank axis), and for
DoRA the column scale ``g = m / ‖W + s·BA‖`` (the norm detached), labelled likewise: the
value is ``(w + s·BA) ⊙ g``, and a rule multiplies its output by ``g``. A quantised base is
a :class:`LazyBase`, decoded only where a rule consumes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn import _adalora, _dora
from lorax_fn._leaves import LoraLeaf, factor_axes, merge_dense

Labels = tuple[Any, ...]


class NoRule(Exception):
  """Raised by a rule that cannot keep this use of a LoRA value factored.

  The interpreter catches exactly this (never JAX's own errors) and materialises
  ``W + s·BA`` for that one operation.
  """


class LazyBase:
  """A quantised base seen through views, decoded only where a rule consumes it.

  Compute rules decode it inside ``jax.checkpoint`` together with the matmul that uses it,
  so the backward pass decodes again instead of keeping a full-precision copy of every
  layer alive (the memory QLoRA is for).
  """

  def __init__(
    self, q: Any, views: tuple[Callable[[jax.Array], jax.Array], ...] = (), elementwise=True
  ):
    # ``elementwise``: every view is a cast, so kernel axis 0 is still the stored axis 0.
    self.q, self.views, self.elementwise = q, views, elementwise
    self.aval = jax.eval_shape(self.decode, q)

  @property
  def row_axis(self) -> int:
    """The kernel axis :meth:`decode_rows` slices (the stored rows: axis 0 unless transposed)."""
    return getattr(self.q, "row_axis", 0)

  def decode_rows(self, start: Any, rows: int) -> jax.Array:
    w = lax.stop_gradient(self.q.decode_rows(start, rows).astype(self.q.dtype))
    for view in self.views:
      w = view(w)
    return w

  def decode(self, q: Any) -> jax.Array:
    w = lax.stop_gradient(q.dequantize())
    for view in self.views:
      w = view(w)
    return w

  def then(self, view: Callable[[jax.Array], jax.Array], elementwise: bool) -> LazyBase:
    return LazyBase(self.q, (*self.views, view), self.elementwise and elementwise)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.aval.shape)

  @property
  def dtype(self) -> Any:
    return self.aval.dtype

  @property
  def ndim(self) -> int:
    return len(self.aval.shape)

  def array(self) -> jax.Array:
    return self.decode(self.q)


jax.tree_util.register_pytree_node(
  LazyBase,
  lambda b: ((b.q,), (b.views, b.elementwise)),
  lambda aux, kids: LazyBase(kids[0], *aux),
)


def base_call(w: Any, fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
  """``fn(w, *args)``; a quantised base is decoded inside a checkpoint with the call."""
  if not isinstance(w, LazyBase):
    return fn(w, *args)
  return jax.checkpoint(lambda q, *a: fn(w.decode(q), *a))(w.q, *args)


def view_w(w: Any, view: Callable[[jax.Array], jax.Array], elementwise: bool = False) -> Any:
  return w.then(view, elementwise) if isinstance(w, LazyBase) else view(w)


def dense(w: Any) -> jax.Array:
  return w.array() if isinstance(w, LazyBase) else w


@dataclasses.dataclass(frozen=True)
class LoraVal:
  """A LoRA kernel inside the interpreter: ``w + scale * einsum(a, b)`` over its labels.

  With DoRA, times ``g`` (``m / ‖W + s·BA‖``) over the view axes ``g_axes``.
  """

  w: jax.Array
  a: jax.Array
  b: jax.Array
  a_axes: tuple[int | None, ...]
  b_axes: tuple[int | None, ...]
  scale: float
  dropout: float
  g: jax.Array | None = None
  g_axes: tuple[int, ...] = ()

  @classmethod
  def from_leaf(cls, leaf: LoraLeaf) -> LoraVal:
    a_axes, b_axes = factor_axes(leaf.roles)
    w = LazyBase(leaf.w) if leaf.is_quantized else lax.stop_gradient(leaf.w)
    if leaf.e is not None:  # AdaLoRA: B·(Λ ⊙ A), a plain low-rank term
      return cls(w, _adalora.effective_a(leaf), leaf.b, a_axes, b_axes, leaf.scale, leaf.dropout)
    if leaf.m is None:
      return cls(w, leaf.a, leaf.b, a_axes, b_axes, leaf.scale, leaf.dropout)
    g, g_axes = _dora.column_scale(leaf), _dora.magnitude_axes(leaf.roles)
    return cls(w, leaf.a, leaf.b, a_axes, b_axes, leaf.scale, leaf.dropout, g, g_axes)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def ndim(self) -> int:
    return self.w.ndim

  def materialize(self) -> jax.Array:
    w = dense(self.w)
    if self.g is None:
      return merge_dense(w, self.a, self.a_axes, self.b, self.b_axes, self.scale)
    compute = jnp.promote_types(jnp.promote_types(w.dtype, self.a.dtype), self.g.dtype)
    merged = merge_dense(w, self.a, self.a_axes, self.b, self.b_axes, self.scale, compute)
    return (merged * place(self.g, self.g_axes, range(self.ndim))).astype(w.dtype)

  def labels(self) -> tuple[Labels, Labels]:
    """Factor labels with the rank axis as the label ``"r"``."""
    return (
      tuple("r" if i is None else i for i in self.a_axes),
      tuple("r" if i is None else i for i in self.b_axes),
    )


jax.tree_util.register_dataclass(
  LoraVal,
  data_fields=["w", "a", "b", "g"],
  meta_fields=["a_axes", "b_axes", "scale", "dropout", "g_axes"],
)


def place(g: jax.Array, g_lab: Sequence[Any], out_lab: Sequence[Any]) -> jax.Array:
  """``g`` (labelled ``g_lab``) transposed and reshaped to broadcast against ``out_lab``."""
  out_lab = list(out_lab)
  order = [l for l in out_lab if l in g_lab]
  g = _transpose(g, g_lab, order)
  return g.reshape([g.shape[order.index(l)] if l in order else 1 for l in out_lab])


def _transpose(x: jax.Array, xl: Sequence[Any], order: Sequence[Any]) -> jax.Array:
  perm = [list(xl).index(l) for l in order]
  return x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)


def arrange(x: jax.Array, xl: Sequence[Any], order: Sequence[Any]) -> jax.Array:
  """Transposes labelled ``x`` into ``order``."""
  return _transpose(x, xl, order)
