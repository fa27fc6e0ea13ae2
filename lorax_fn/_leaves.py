"""The LoRA leaf: a frozen base weight plus trainable low-rank factors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate

Layout = tuple[str, ...]
"""Role of each axis of a kernel: ``"in"`` (contracted with the input), ``"out"`` or ``"stack"``."""

ROLES = ("in", "out", "stack")


def factor_axes(roles: Sequence[str]) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
  """Which kernel axis each axis of ``a`` and ``b`` stands for (``None``: the rank axis).

  ``a`` is laid out ``stack + (rank,) + in`` and ``b`` is ``stack + (rank,) + out``, each
  group in the kernel's axis order: rank-first, like PEFT's ``lora_A (r, in)``. On XLA:CPU
  this orientation made a LoRA site's forward + backward 1.2-2x faster than ``(in, rank)``
  in micro-benchmarks of ViT-S-sized matmuls (the adapter-gradient matmuls then write
  their small result row-major).
  """
  stack = tuple(i for i, r in enumerate(roles) if r == "stack")
  ins = tuple(i for i, r in enumerate(roles) if r == "in")
  outs = tuple(i for i, r in enumerate(roles) if r == "out")
  return stack + (None,) + ins, stack + (None,) + outs


def factor_shapes(
  shape: Sequence[int], roles: Sequence[str], rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of ``a`` and ``b`` for a kernel of ``shape`` with axis ``roles``."""
  a_axes, b_axes = factor_axes(roles)
  a_shape = tuple(rank if i is None else shape[i] for i in a_axes)
  b_shape = tuple(rank if i is None else shape[i] for i in b_axes)
  return a_shape, b_shape


def lowrank_product(
  a: jax.Array,
  a_axes: Sequence[int | None],
  b: jax.Array,
  b_axes: Sequence[int | None],
  ndim: int,
) -> jax.Array:
  """``einsum`` of the factors over the rank axis, in kernel axis order."""
  rank_label = ndim
  a_lab = [rank_label if i is None else i for i in a_axes]
  b_lab = [rank_label if i is None else i for i in b_axes]
  return jnp.einsum(a, a_lab, b, b_lab, list(range(ndim)))


def merge_dense(
  w: jax.Array,
  a: jax.Array,
  a_axes: Sequence[int | None],
  b: jax.Array,
  b_axes: Sequence[int | None],
  scale: float,
  dtype: jnp.dtype | None = None,
) -> jax.Array:
  """``w + scale * B·A`` computed in float32 (or wider), returned in ``dtype`` (default w's)."""
  compute = jnp.promote_types(jnp.promote_types(a.dtype, w.dtype), jnp.float32)
  delta = lowrank_product(a.astype(compute), a_axes, b.astype(compute), b_axes, w.ndim)
  return (w.astype(compute) + scale * delta).astype(w.dtype if dtype is None else dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLeaf:
  """A kernel ``W`` with a low-rank update: it stands for ``W + scale * B·A``.

  ``w`` is the frozen base, ``a`` and ``b`` the trainable factors; the axis roles, rank,
  alpha and options are static pytree metadata, never leaves, so ``jit`` does not trace
  them and optimisers never see them.

  Attributes:
    w: frozen base weight (any float dtype).
    a: factor of shape ``stack + (rank,) + in``.
    b: factor of shape ``stack + (rank,) + out``.
    roles: role of each axis of ``w``: ``"in"``, ``"out"`` or ``"stack"``.
    rank: the rank ``r``.
    alpha: the LoRA alpha.
    rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the input of the low-rank path (train time only).
    m: DoRA's trainable magnitude (``None``: plain LoRA), one entry per output unit: the
      shape of ``w`` without its ``"in"`` axes. The leaf then stands for
      ``m / ‖W + scale·B·A‖ ⊙ (W + scale·B·A)``, the norm taken over the ``"in"`` axes.
    e: AdaLoRA's trainable singular values Λ (``None``: plain LoRA), of shape
      ``stack + (rank,)``. The leaf then stands for ``W + alpha/(rank + 1e-5)·B·(Λ ⊙ A)``
      (PEFT's ``SVDLinear``; see :func:`lorax_fn.adalora`).
    base_init: static; the ``wrap(init=...)`` that replaced the base (``"pissa"``,
      ``"pissa_niter_K"``, ``"olora"``, ``"loftq"``): ``w`` is then its residual (or LoftQ's
      quantised weight), not the kernel ``wrap`` was given. ``None`` for every other leaf.
      :func:`lorax_fn.save_peft` reads it to write the adapter against the right base.
  """

  w: jax.Array
  a: jax.Array
  b: jax.Array
  roles: Layout = dataclasses.field(metadata=dict(static=True))
  rank: int = dataclasses.field(metadata=dict(static=True))
  alpha: float = dataclasses.field(metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  m: jax.Array | None = None
  e: jax.Array | None = None
  base_init: str | None = dataclasses.field(default=None, metadata=dict(static=True))

  def __post_init__(self) -> None:
    # Runs on every unflatten too: static fields only, which are cheap to check.
    if not isinstance(self.roles, tuple) or any(r not in ROLES for r in self.roles):
      raise ValueError(
        f"LoraLeaf roles must be a tuple of {ROLES}, one per axis; got: {self.roles!r}"
      )
    _validate.positive_int("LoraLeaf rank", self.rank)
    _validate.positive_number("LoraLeaf alpha", self.alpha)
    _validate.boolean("LoraLeaf rslora", self.rslora)
    _validate.rate("LoraLeaf dropout", self.dropout)
    if self.base_init is not None and not isinstance(self.base_init, str):
      raise TypeError(f"LoraLeaf base_init must be a str or None; got: {self.base_init!r}")

  @property
  def scale(self) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def is_quantized(self) -> bool:
    """True when the base is a quantised leaf (QLoRA)."""
    return hasattr(self.w, "dequantize")

  @property
  def dtype(self) -> jnp.dtype:
    return self.w.dtype

  @property
  def ndim(self) -> int:
    return len(self.roles)

  @property
  def dora(self) -> bool:
    """True for a DoRA leaf (one with a magnitude ``m``)."""
    return self.m is not None

  def merged(self, dtype: jnp.dtype | None = None) -> jax.Array:
    """``W + scale * B·A`` as one dense array, in ``dtype`` (default: ``w``'s dtype).

    With DoRA, ``m / ‖W + scale·B·A‖ ⊙ (W + scale·B·A)``. A quantised base is dequantised
    first; quantising the result again would change the model's outputs (the low-rank
    update is not on the quantisation grid).
    """
    from lorax_fn._adalora import effective_a  # (an import cycle at module level)

    a_axes, b_axes = factor_axes(self.roles)
    dtype = self.w.dtype if dtype is None else dtype
    a = self.a if self.e is None else effective_a(self)
    if self.m is None:
      return merge_dense(self.base(), a, a_axes, self.b, b_axes, self.scale, dtype)
    w = self.base()
    compute = jnp.promote_types(jnp.promote_types(self.a.dtype, w.dtype), jnp.float32)
    merged = merge_dense(w, a, a_axes, self.b, b_axes, self.scale, compute)
    ins = tuple(i for i, r in enumerate(self.roles) if r == "in")
    norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=ins, keepdims=True))
    m = jnp.expand_dims(self.m.astype(compute), ins)
    return (merged * (m / jnp.where(norm > 0, norm, 1))).astype(dtype)

  def base(self) -> jax.Array:
    """The base weight as an array (a quantised base dequantised)."""
    return self.w.dequantize() if hasattr(self.w, "dequantize") else self.w

  def check(self, path: str) -> None:
    """Raises ``ValueError`` naming ``path`` if the factors are missing or do not fit ``w``."""
    missing = [f for f in ("w", "a", "b") if getattr(self, f) is None]
    if missing:
      half = "frozen" if "w" in missing else "trainable"
      raise ValueError(
        f"LoRA leaf at {path!r} has no {' or '.join(missing)} (None): it is one half of "
        f"lorax_fn.split; combine it with the {half} half first: combine(trainable, frozen)."
      )
    extra = tuple(f for f in ("m", "e") if getattr(self, f) is not None)
    for name in ("w", "a", "b") + extra:
      x = getattr(self, name)
      if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"LoRA leaf at {path!r}: {name} must be an array; got: {type(x).__name__}")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"LoRA leaf at {path!r}: {name} must be a float array; got dtype {x.dtype}")
    if len(self.roles) != len(self.shape):
      raise ValueError(
        f"LoRA leaf at {path!r}: roles {self.roles} must name every axis of the base "
        f"weight of shape {self.shape}; got {len(self.roles)} roles for {len(self.shape)} axes."
      )
    a_shape, b_shape = factor_shapes(self.w.shape, self.roles, self.rank)
    if tuple(self.a.shape) != a_shape or tuple(self.b.shape) != b_shape:
      raise ValueError(
        f"LoRA leaf at {path!r}: base weight of shape {self.shape} with layout {self.roles} "
        f"and rank {self.rank} expects a of shape {a_shape} and b of shape {b_shape}; "
        f"got a {tuple(self.a.shape)} and b {tuple(self.b.shape)}."
      )
    m_shape = magnitude_shape(self.w.shape, self.roles)
    if self.m is not None and tuple(self.m.shape) != m_shape:
      raise ValueError(
        f"DoRA leaf at {path!r}: base weight of shape {self.shape} with layout {self.roles} "
        f"expects a magnitude m of shape {m_shape} (its axes but the 'in' ones); got "
        f"{tuple(self.m.shape)}."
      )
    e_shape = a_shape[: self.roles.count("stack") + 1]
    if self.e is not None and tuple(self.e.shape) != e_shape:
      raise ValueError(
        f"AdaLoRA leaf at {path!r}: rank {self.rank} and layout {self.roles} expect singular "
        f"values e of shape {e_shape} (stack + rank); got {tuple(self.e.shape)}."
      )


def magnitude_shape(shape: Sequence[int], roles: Sequence[str]) -> tuple[int, ...]:
  """Shape of DoRA's magnitude ``m``: the kernel's axes but its ``"in"`` ones."""
  return tuple(d for d, r in zip(shape, roles, strict=True) if r != "in")


def trainable_fields(x: LoraLeaf | LoraStack) -> dict[str, bool | None]:
  """Per array field of a LoRA node: trained (``a``, ``b``, DoRA's ``m``, AdaLoRA's ``e``) or not.

  An absent ``m`` or ``e`` stays ``None``, so masks keep the structure of the tree they describe.
  """
  optional = ("m", "e")
  return {
    f: None if f in optional and getattr(x, f) is None else f in ("a", "b") + optional
    for f in data_fields(x)
  }


def is_lora(x: object) -> bool:
  """True for a :class:`LoraLeaf`."""
  return isinstance(x, LoraLeaf)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
  """The factors of ``N`` adapters of one kernel: ``W + scales[k]·strengths[k]·B[k]·A[k]``.

  Attributes:
    w: the frozen base weight (any float dtype, or a quantised leaf).
    a: ``(N,) + stack + (rank,) + in``: each slot's A, rows past its own rank zero.
    b: ``(N,) + stack + (rank,) + out``: each slot's B, likewise.
    scales: ``(N,)`` float32: each slot's ``alpha / r`` (``/ sqrt(r)`` with rsLoRA).
    ranks: ``(N,)`` float32: each slot's own rank, a whole number (0: empty). Float, so that
      ``jax.grad`` over a whole stacked tree works; it is never trained.
    strengths: ``(N,)`` float32: each slot's strength (:func:`lorax_fn.set_strength`), 1 when
      an adapter is loaded, 0 for an empty or evicted slot.
    roles: the kernel's axis roles.
    rank: the stack's rank (the largest a slot can hold).
    dropout: dropout on the input of the low-rank path, for every slot.
  """

  w: Any
  a: jax.Array
  b: jax.Array
  scales: jax.Array
  ranks: jax.Array
  strengths: jax.Array
  roles: Layout = dataclasses.field(metadata=dict(static=True))
  rank: int = dataclasses.field(metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def slots(self) -> int:
    return int(np.shape(self.a)[0])

  def check(self, path: str) -> None:
    """Raises ``ValueError`` naming ``path`` if the stacked factors do not fit ``w``."""
    missing = [
      f for f in ("w", "a", "b", "scales", "ranks", "strengths") if getattr(self, f) is None
    ]
    if missing:
      raise ValueError(
        f"stacked LoRA leaf at {path!r} has no {', '.join(missing)}: it is one half of "
        "lorax_fn.split; combine the halves first (lorax_fn.combine)"
      )
    n = self.slots
    a_shape, b_shape = factor_shapes(self.w.shape, self.roles, self.rank)
    if tuple(self.a.shape) != (n, *a_shape) or tuple(self.b.shape) != (n, *b_shape):
      raise ValueError(
        f"stacked LoRA leaf at {path!r}: {n} slots of rank {self.rank} over a base of shape "
        f"{self.shape} expect a {(n, *a_shape)} and b {(n, *b_shape)}; got a "
        f"{tuple(self.a.shape)} and b {tuple(self.b.shape)}"
      )
    for field in ("scales", "ranks", "strengths"):
      if tuple(np.shape(getattr(self, field))) != (n,):
        raise ValueError(
          f"stacked LoRA leaf at {path!r}: {field} needs shape ({n},), one per slot; got "
          f"{tuple(np.shape(getattr(self, field)))}"
        )

  def select(self, slot: Any) -> LoraLeaf:
    """Slot ``slot``'s adapter as a :class:`LoraLeaf` whose scale is folded into ``b``.

    ``slot`` may be traced; ``-1`` (or any slot out of range) is the base alone.
    """
    n = self.slots
    valid = (slot >= 0) & (slot < n)
    k = jnp.clip(slot, 0, n - 1)
    scale = jnp.where(valid, self.scales[k] * self.strengths[k], 0.0)
    b = self.b[k] * scale.astype(self.b.dtype)
    return LoraLeaf(
      self.w, self.a[k], b, self.roles, self.rank, float(self.rank), False, self.dropout
    )


def is_stack(x: object) -> bool:
  """True for a :class:`LoraStack`."""
  return isinstance(x, LoraStack)


def is_adapter(x: object) -> bool:
  """True for a :class:`LoraLeaf` or a :class:`LoraStack`: a node holding LoRA factors."""
  return isinstance(x, (LoraLeaf, LoraStack))


def data_fields(x: object) -> tuple[str, ...]:
  """The array fields of a LoRA node (``w``, ``a``, ``b``; a stack's ``scales``, ``ranks``, ...)."""
  return tuple(f.name for f in dataclasses.fields(x) if not f.metadata.get("static"))


def static_fields(x: object) -> tuple[str, ...]:
  """The metadata fields of a LoRA node (rank, alpha, roles, ...)."""
  return tuple(f.name for f in dataclasses.fields(x) if f.metadata.get("static"))
