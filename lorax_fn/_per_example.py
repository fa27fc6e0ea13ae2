"""One adapter per example: ``lora(fn)(..., adapter_ids=ids)`` over stacked adapters.

Each example runs as a batch of one with its slot's factors gathered from the
:class:`~lorax_fn.LoraStack` leaves (:mod:`lorax_fn._stack`), all examples in one vmapped
program, so no ``W + s·BA`` is formed per adapter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _jaxpr
from lorax_fn._leaves import is_stack
from lorax_fn._stack import _is_node


def _has_node(tree: Any) -> bool:
  return any(_is_node(x) for x in jax.tree.leaves(tree, is_leaf=_is_node))


def check_ids(ids: Any, slots: int) -> Any:
  """``adapter_ids`` as an int array of shape ``(n,)``; concrete ids must be in ``[-1, slots)``."""
  if not hasattr(ids, "shape"):
    ids = jnp.asarray(ids)  # a list may hold tracers
  if ids.ndim != 1 or ids.shape[0] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
      f"adapter_ids must be a non-empty 1-D integer array, one slot per example; got shape "
      f"{tuple(ids.shape)} and dtype {ids.dtype}"
    )
  if not _jaxpr.is_tracer(ids):
    values = np.asarray(ids)
    bad = values[(values < -1) | (values >= slots)]
    if bad.size:
      raise ValueError(
        f"adapter_ids must be in [-1, {slots}) (-1: the base alone; the stack has {slots} "
        f"slots); got: {sorted(set(bad.tolist()))[:8]}"
      )
  return ids


def _shared_parts(args: tuple, kwargs: dict, per_example: Any) -> list[bool]:
  """Which arguments (positional, then keyword) are shared by every example."""
  parts = [*args, *kwargs.values()]
  if per_example is None:  # the default rule: the parameters are shared, the rest is not
    return [_has_node(p) for p in parts]
  names = (per_example,) if isinstance(per_example, (int, str)) else per_example
  try:
    names = tuple(names)
  except TypeError:
    names = (per_example,)
  index = {i: i for i in range(len(args))} | {k: len(args) + j for j, k in enumerate(kwargs)}
  for n in names:
    if isinstance(n, bool) or n not in index:
      raise ValueError(
        f"per_example must name arguments of this call: positional indices in "
        f"[0, {len(args)}) or keywords {sorted(kwargs)}; got: {n!r}"
      )
    if _has_node(parts[index[n]]):
      raise ValueError(
        f"per_example names argument {n!r}, which holds the parameters (LoRA, stacked or "
        "quantised leaves); they are shared by every example"
      )
  chosen = {index[n] for n in names}
  return [i not in chosen for i in range(len(parts))]


def run_per_example(
  single: Any, args: tuple, kwargs: dict, ids: Any, key: Any, per_example: Any = None
) -> Any:
  """``single`` run once per example with that example's adapter, as one vmapped program.

  By default the arguments holding LoRA, quantised or stacked leaves (the parameters) are
  shared and every other array argument is per example along its axis 0, which must have
  ``len(ids)`` entries; ``per_example`` (positional indices and keyword names) overrides that:
  exactly those arguments are per example, all others shared (e.g. a Flax cache or a table).
  Example ``i`` runs as a batch of one with its slot's factors gathered (BGMV: no
  ``W + s·BA`` per adapter), so row ``i`` is what running it alone gives.
  """
  stacks = [x for x in jax.tree.leaves((args, kwargs), is_leaf=_is_node) if is_stack(x)]
  if not stacks:
    raise ValueError(
      "adapter_ids was given, but no argument holds stacked adapters; stack them with "
      "lorax_fn.stack_adapters"
    )
  slots = {s.slots for s in stacks}
  if len(slots) > 1:
    raise ValueError(f"the stacked leaves have different numbers of slots {sorted(slots)}")
  ids = check_ids(ids, slots.pop())
  n = ids.shape[0]
  parts = [*args, *kwargs.values()]
  shared = _shared_parts(args, kwargs, per_example)
  leaves, treedef = jax.tree_util.tree_flatten(parts, is_leaf=_is_node)
  owner = [i for i, p in enumerate(parts) for _ in jax.tree.leaves(p, is_leaf=_is_node)]
  per = [
    j
    for j, (x, i) in enumerate(zip(leaves, owner, strict=True))
    if not shared[i] and hasattr(x, "shape") and np.ndim(x) >= 1
  ]
  for j in per:
    if np.shape(leaves[j])[0] != n:
      where = f"argument {owner[j]}" if owner[j] < len(args) else "a keyword argument"
      raise ValueError(
        f"{where} has a leading (example) axis of size {np.shape(leaves[j])[0]}, but "
        f"adapter_ids has {n} entries: per-example arguments need the example axis first"
      )

  def one(slot: Any, index: Any, examples: list[Any]) -> Any:
    full = [x.select(slot) if is_stack(x) else x for x in leaves]
    for j, x in zip(per, examples, strict=True):
      full[j] = x[None]
    rebuilt = jax.tree_util.tree_unflatten(treedef, full)
    a, kw = rebuilt[: len(args)], dict(zip(kwargs, rebuilt[len(args) :], strict=True))
    out = single(a, kw, None if key is None else jax.random.fold_in(key, index))
    for path, y in jax.tree_util.tree_flatten_with_path(out)[0]:
      if np.ndim(y) == 0 or np.shape(y)[0] != 1:
        raise ValueError(
          f"with adapter_ids, every output of fn must keep the example axis first; the output "
          f"at {jax.tree_util.keystr(path) or 'the top'} has shape {np.shape(y)} for one example"
        )
    return jax.tree.map(lambda y: y[0], out)

  return jax.vmap(one)(ids, jnp.arange(n), [leaves[j] for j in per])
