"""Many adapters over one base: stacked factors, hot-swap, strength.

A :class:`LoraStack` holds the factors of ``N`` adapters of one kernel with a leading adapter
axis. Ranks are padded with zeros to the largest (a zero row of A and of B adds nothing), and
each adapter's scale ``alpha / r`` travels as data, so adapters of any rank up to the stack's
and any alpha share one compiled function: loading another adapter into a slot, or changing a
strength, is a device transfer, never a recompilation. Running one adapter per example is
:mod:`lorax_fn._per_example`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _jaxpr, _paths, _validate
from lorax_fn._leaves import LoraLeaf, LoraStack, factor_axes, is_lora, is_stack
from lorax_fn._quant import is_quant


def _is_node(x: Any) -> bool:
  return is_lora(x) or is_quant(x) or is_stack(x)


def _flat(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)
  return [(_paths.path_str(p), x) for p, x in flat], treedef


def _same_array(x: Any, y: Any) -> bool:
  if x is y:
    return True
  if is_quant(x) or is_quant(y):
    return (
      is_quant(x)
      and is_quant(y)
      and all(
        _same_array(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
      )
    )
  if np.shape(x) != np.shape(y) or getattr(x, "dtype", None) != getattr(y, "dtype", None):
    return False
  if not hasattr(x, "dtype") or not hasattr(y, "dtype"):
    return bool(np.array_equal(np.asarray(x), np.asarray(y)))
  # On the device: a base of billions of parameters is never copied to the host to compare.
  return bool(jnp.array_equal(x, y))


def _scale(leaf: LoraLeaf) -> float:
  return leaf.scale


def _padded(f: jax.Array, axis: int, rank: int) -> jax.Array:
  pad = [(0, 0)] * f.ndim
  pad[axis] = (0, rank - f.shape[axis])
  return jnp.pad(f, pad)


def _rank_axes(roles: Sequence[str]) -> tuple[int, int]:
  """Where the rank axis is in ``a`` and in ``b``."""
  a_axes, b_axes = factor_axes(roles)
  return a_axes.index(None), b_axes.index(None)


def stack_adapters(adapters: Sequence[Any], *, rank: int | None = None) -> Any:
  """Stacks wrapped trees over one base into one tree of :class:`LoraStack` nodes.

  Slot ``k`` holds ``adapters[k]``; run it per example with
  ``lora(fn)(stacked, x, adapter_ids=ids)``. Ranks are padded with zeros to ``rank``
  (default: the largest), and scales are data, so adapters of other ranks and alphas can be
  loaded into the slots later (:func:`set_adapter`) without recompiling.

  Args:
    adapters: wrapped pytrees (:func:`wrap`) of the same base, targets and layouts.
    rank: the rank every slot can hold; at least the largest adapter's.

  Returns:
    The tree of ``adapters[0]`` with a :class:`LoraStack` at each LoRA leaf.

  Raises:
    ValueError: no adapters, or adapters that differ in structure, targets, layouts, base
      weights, dropout or other leaves (the first differing path is named), or a ``rank``
      below an adapter's.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> p1 = lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(0))
    >>> p2 = lora_fn.wrap(base, rank=3, alpha=6.0, targets=("fc",), key=jax.random.key(1))
    >>> stacked = lora_fn.stack_adapters([p1, p2])
    >>> stacked["fc"]["kernel"].a.shape, stacked["fc"]["kernel"].scales.tolist()
    ((2, 3, 5), [1.0, 2.0])
  """
  if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
    raise ValueError(f"adapters must be a non-empty sequence of wrapped trees; got: {adapters!r}")
  flats = [_flat(p) for p in adapters]
  (first, treedef) = flats[0]
  for k, (flat, other) in enumerate(flats[1:], 1):
    if other != treedef:
      paths0, pathsk = [p for p, _ in first], [p for p, _ in flat]
      diff = next(
        (f"{a!r} vs {b!r}" for a, b in zip(paths0, pathsk, strict=False) if a != b),
        f"{len(paths0)} leaves vs {len(pathsk)}",
      )
      raise ValueError(f"adapters[{k}] has another structure than adapters[0] ({diff})")
  for i, (path, _) in enumerate(first):
    _check_column(path, [flat[i][1] for flat, _ in flats])
  if not any(is_lora(x) for _, x in first):
    raise ValueError("adapters hold no LoRA leaf; pass trees returned by lorax_fn.wrap")
  top = max(x.rank for flat, _ in flats for _, x in flat if is_lora(x))
  if rank is not None:
    rank = _validate.positive_int("rank", rank)
    if rank < top:
      raise ValueError(f"rank must be at least the largest adapter's rank {top}; got: {rank}")
  out = []
  for i, (_, leaf) in enumerate(first):
    column = [flat[i][1] for flat, _ in flats]
    out.append(_stack(column, rank or top) if is_lora(leaf) else leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_column(path: str, column: list[Any], what: str = "stack_adapters stacks") -> None:
  """All of ``column`` (one path of each adapter) must share base, layout, dropout, extras."""
  leaf = column[0]
  for k, x in enumerate(column):
    _refuse_dora(path, x, f"adapters[{k}]", what)
  for k, other in enumerate(column[1:], 1):
    if is_lora(leaf) != is_lora(other):
      raise ValueError(
        f"adapters[{k}] differs from adapters[0] at {path!r}: one has a LoRA leaf there and "
        "the other not (other targets)"
      )
    if is_lora(leaf):
      if leaf.roles != other.roles:
        raise ValueError(
          f"adapters[{k}] has layout {other.roles} at {path!r}; adapters[0] has {leaf.roles}"
        )
      if leaf.dropout != other.dropout:
        raise ValueError(
          f"adapters[{k}] has dropout {other.dropout} at {path!r}; adapters[0] has "
          f"{leaf.dropout} (a stack has one)"
        )
      if not _same_array(leaf.w, other.w):
        raise ValueError(f"adapters[{k}] has another base weight at {path!r} than adapters[0]")
    elif not _same_array(leaf, other):
      raise ValueError(
        f"adapters[{k}] differs from adapters[0] at {path!r}, which is not a LoRA leaf; "
        f"{what} LoRA factors over one shared base (a trained head is not a LoRA factor)"
      )


def _refuse_dora(path: str, leaf: Any, name: str, what: str) -> None:
  if is_lora(leaf) and leaf.dora:
    raise ValueError(
      f"{name} has a DoRA leaf at {path!r} (wrap(..., dora=True)); {what} plain LoRA factors "
      "only: a DoRA magnitude rescales the whole kernel, not a low-rank term (merge it instead: "
      "lorax_fn.merge)"
    )
  if is_lora(leaf) and leaf.e is not None:
    raise ValueError(
      f"{name} has an AdaLoRA leaf at {path!r} (wrap(..., adalora=True)); {what} plain LoRA "
      "factors only (merge it instead: lorax_fn.merge)"
    )


def _stack(column: list[LoraLeaf], rank: int) -> LoraStack:
  leaf = column[0]
  ra, rb = _rank_axes(leaf.roles)
  dtype = jnp.result_type(*(x.a.dtype for x in column))
  a = jnp.stack([_padded(x.a.astype(dtype), ra, rank) for x in column])
  b = jnp.stack([_padded(x.b.astype(dtype), rb, rank) for x in column])
  scales = jnp.asarray([_scale(x) for x in column], jnp.float32)
  ranks = jnp.asarray([x.rank for x in column], jnp.float32)
  strengths = jnp.ones((len(column),), jnp.float32)
  return LoraStack(leaf.w, a, b, scales, ranks, strengths, leaf.roles, rank, leaf.dropout)


def _slot_index(stack: LoraStack, slot: int, path: str) -> int:
  if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
    raise TypeError(f"slot must be an int; got: {slot!r}")
  if not 0 <= slot < stack.slots:
    raise ValueError(f"slot must be in [0, {stack.slots}) (the stack at {path!r}); got: {slot}")
  return int(slot)


def set_adapter(stacked: Any, slot: int, adapter: Any) -> Any:
  """Loads one wrapped tree's factors into slot ``slot`` of a stacked tree (a hot-swap).

  Only arrays change (their shapes stay), so a function compiled for ``stacked`` runs the new
  adapter without recompiling. The slot's strength is reset to 1.

  Args:
    stacked: a tree from :func:`stack_adapters`.
    slot: the slot to overwrite.
    adapter: a wrapped tree of the same base and targets (from :func:`wrap`,
      :func:`restore_adapter` or :func:`load_peft`), of ranks up to the stack's.

  Returns:
    The stacked tree with the slot replaced.

  Raises:
    ValueError: an adapter of other targets or layouts, another base weight, a non-LoRA leaf
      that differs from the stack's (a trained head cannot go into a slot), a rank above the
      stack's, or a slot out of range (each names the path).

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> p = [lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(i)) for i in (0, 1)]
    >>> stacked = lora_fn.stack_adapters(p)
    >>> p2 = lora_fn.wrap(base, rank=1, alpha=3.0, targets=("fc",), key=jax.random.key(2))
    >>> lora_fn.set_adapter(stacked, 1, p2)["fc"]["kernel"].scales.tolist()
    [1.0, 3.0]
  """
  flat, treedef = _flat(stacked)
  other, other_def = _flat(adapter)
  if other_def != treedef:
    raise ValueError("adapter has another structure than the stacked tree (other targets?)")
  out = []
  for (path, s), (_, leaf) in zip(flat, other, strict=True):
    if not is_stack(s):
      if is_lora(leaf):
        raise ValueError(f"adapter has a LoRA leaf at {path!r}, where the stack has none")
      if not _same_array(s, leaf):
        raise ValueError(
          f"adapter differs from the stack at {path!r}, which is not a LoRA leaf: a slot holds "
          "LoRA factors only, over the stack's shared leaves (a trained head cannot be loaded "
          "into a slot; serve it with its own base, or train it as an adapter)"
        )
      out.append(s)
      continue
    if not is_lora(leaf):
      raise ValueError(f"adapter has no LoRA leaf at {path!r}, where the stack has one")
    _refuse_dora(path, leaf, "adapter", "a stack's slots hold")
    if leaf.roles != s.roles:
      raise ValueError(f"adapter has layout {leaf.roles} at {path!r}; the stack has {s.roles}")
    if not _same_array(leaf.w, s.w):
      raise ValueError(f"adapter has another base weight at {path!r} than the stack")
    if leaf.rank > s.rank:
      raise ValueError(
        f"adapter has rank {leaf.rank} at {path!r}; the stack's slots hold rank {s.rank} at most"
      )
    k = _slot_index(s, slot, path)
    ra, rb = _rank_axes(s.roles)
    out.append(
      dataclasses.replace(
        s,
        a=s.a.at[k].set(_padded(leaf.a.astype(s.a.dtype), ra, s.rank)),
        b=s.b.at[k].set(_padded(leaf.b.astype(s.b.dtype), rb, s.rank)),
        scales=s.scales.at[k].set(leaf.scale),
        ranks=s.ranks.at[k].set(leaf.rank),
        strengths=s.strengths.at[k].set(1.0),
      )
    )
  return jax.tree_util.tree_unflatten(treedef, out)


def unstack_adapter(stacked: Any, slot: int) -> Any:
  """Slot ``slot`` of a stacked tree as a plain wrapped tree (its own rank; alpha = scale·r).

  The slot's strength (:func:`set_strength`) is a serving setting, not part of the adapter: it
  is not folded in. Use :func:`scale_adapter` on the result for that.

  Raises:
    ValueError: if the slot is out of range or empty.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> p1 = lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(0))
    >>> p2 = lora_fn.wrap(base, rank=3, targets=("fc",), key=jax.random.key(1))
    >>> leaf = lora_fn.unstack_adapter(lora_fn.stack_adapters([p1, p2]), 0)["fc"]["kernel"]
    >>> leaf.rank, bool((leaf.a == p1["fc"]["kernel"].a).all())
    (2, True)
  """

  def one(path: str, s: Any) -> Any:
    if not is_stack(s):
      return s
    k = _slot_index(s, slot, path)
    r = round(float(s.ranks[k]))
    if r == 0:
      raise ValueError(f"slot {k} of the stack at {path!r} is empty")
    ra, rb = _rank_axes(s.roles)
    a = jax.lax.slice_in_dim(s.a[k], 0, r, axis=ra)
    b = jax.lax.slice_in_dim(s.b[k], 0, r, axis=rb)
    return LoraLeaf(s.w, a, b, s.roles, r, float(s.scales[k]) * r, False, s.dropout)

  flat, treedef = _flat(stacked)
  return jax.tree_util.tree_unflatten(treedef, [one(p, x) for p, x in flat])


def set_strength(stacked: Any, strengths: Any) -> Any:
  """Sets each slot's strength: slot ``k`` runs as ``W + strengths[k]·s_k·B_k·A_k``.

  Strengths are data, so this recompiles nothing. They replace the previous ones (they do not
  multiply them); a strength of 0 turns a slot off, 1 is the adapter as trained.

  Args:
    stacked: a tree from :func:`stack_adapters` (or an :class:`AdapterPool`'s ``params``).
    strengths: one finite number per slot.

  Returns:
    The stacked tree with the new strengths.

  Raises:
    ValueError: if ``strengths`` does not hold one finite number per slot, gives an empty
      slot a non-zero strength, or ``stacked`` holds no stack.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> p = [lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(i)) for i in (0, 1)]
    >>> s = lora_fn.set_strength(lora_fn.stack_adapters(p), [0.5, 2.0])
    >>> s["fc"]["kernel"].strengths.tolist(), s["fc"]["kernel"].scales.tolist()
    ([0.5, 2.0], [1.0, 1.0])
  """
  try:
    strengths = np.asarray(strengths, np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f"strengths must be numbers, one per slot; got: {strengths!r}") from e

  def one(path: str, s: Any) -> Any:
    if not is_stack(s):
      return s
    if strengths.shape != (s.slots,) or not np.isfinite(strengths).all():
      raise ValueError(
        f"strengths must hold {s.slots} finite numbers, one per slot (the stack at {path!r}); "
        f"got: {strengths.tolist()}"
      )
    if not _jaxpr.is_tracer(s.ranks):
      empty = [k for k in range(s.slots) if float(s.ranks[k]) == 0 and strengths[k] != 0]
      if empty:
        raise ValueError(
          f"slots {empty} of the stack at {path!r} are empty; load an adapter into a slot "
          "(set_adapter, AdapterPool.load) before giving it a strength"
        )
    return dataclasses.replace(s, strengths=jnp.asarray(strengths))

  flat, treedef = _flat(stacked)
  if not any(is_stack(x) for _, x in flat):
    raise ValueError("set_strength: stacked holds no stack; build one with stack_adapters")
  return jax.tree_util.tree_unflatten(treedef, [one(p, x) for p, x in flat])


def scale_adapter(params: Any, strength: float) -> Any:
  """One adapter at another strength: ``W + strength·s·BA`` (``B`` scaled: data, no recompile).

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": jnp.ones((5, 7))}, rank=2, targets=("fc",), key=jax.random.key(0))
    >>> float(lora_fn.scale_adapter(p, 0.5)["fc"].b.sum()) == 0.0  # B = 0 at init
    True
  """
  if (
    isinstance(strength, bool)
    or not isinstance(_validate._scalar(strength), (int, float))
    or not math.isfinite(_validate._scalar(strength))
  ):
    raise ValueError(f"strength must be a finite number; got: {strength!r}")

  def one(x: Any) -> Any:
    if is_lora(x):
      return dataclasses.replace(x, b=x.b * jnp.asarray(strength, x.b.dtype))
    return x

  if any(is_stack(x) for _, x in _flat(params)[0]):
    raise ValueError(
      "scale_adapter: params hold stacked adapters; set a slot's strength with "
      "lorax_fn.set_strength(stacked, strengths)"
    )
  if not any(is_lora(x) for x in jax.tree.leaves(params, is_leaf=is_lora)):
    raise ValueError("scale_adapter: params hold no LoRA leaf")
  return jax.tree.map(one, params, is_leaf=is_lora)
