"""``AdapterPool``: vLLM-style dynamic adapters for any JAX model.

A fixed number of slots over one base; adapters are loaded into slots by name (from disk,
through a loader, or given as trees) and the least recently used one is evicted when the
pool is full. Every load is a device transfer into a slot of the same shapes, so a function
compiled for the pool's ``params`` never recompiles.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate
from lorax_fn._leaves import LoraStack, factor_shapes, is_lora
from lorax_fn._stack import _flat, set_adapter, stack_adapters


def _empty(leaf: Any, slots: int, rank: int) -> Any:
  if not is_lora(leaf):
    return leaf
  stacked = stack_adapters([{"x": leaf}], rank=rank)["x"]
  return dataclasses.replace(
    stacked,
    a=jnp.zeros((slots, *stacked.a.shape[1:]), stacked.a.dtype),
    b=jnp.zeros((slots, *stacked.b.shape[1:]), stacked.b.dtype),
    scales=jnp.zeros((slots,), jnp.float32),
    ranks=jnp.zeros((slots,), jnp.float32),
    strengths=jnp.zeros((slots,), jnp.float32),
  )


def _restore(source: str | os.PathLike, template: Any) -> Any:
  """A :func:`save_adapter` checkpoint with its own ranks and alphas, over ``template``'s base."""
  from lorax_fn._restore import read_adapter_config, restore_adapter

  record = read_adapter_config(source)
  saved = record.get("lora", {})
  flat, treedef = _flat(template)
  out = []
  for path, leaf in flat:
    spec = saved.get(path)
    if is_lora(leaf) and isinstance(spec, dict) and isinstance(spec.get("rank"), int):
      rank = spec["rank"]
      a_shape, b_shape = factor_shapes(leaf.w.shape, leaf.roles, rank)
      leaf = dataclasses.replace(
        leaf,
        a=jax.ShapeDtypeStruct(a_shape, _dtype(record, f"{path}/a", leaf.a.dtype)),
        b=jax.ShapeDtypeStruct(b_shape, _dtype(record, f"{path}/b", leaf.b.dtype)),
        rank=rank,
        alpha=spec.get("alpha", leaf.alpha),
        rslora=spec.get("rslora", leaf.rslora),
      )
    out.append(leaf)
  # Anything else that differs (targets, layouts, shapes) is restore_adapter's error.
  return restore_adapter(source, jax.tree_util.tree_unflatten(treedef, out))


def _dtype(record: dict, key: str, default: Any) -> Any:
  spec = record.get("arrays", {}).get(key)
  try:
    return np.dtype(spec[1])
  except (TypeError, IndexError, KeyError, ValueError):
    return default


class AdapterPool:
  """Adapters over one base in ``slots`` slots, by name, least recently used evicted.

  Args:
    template: a wrapped tree of the base (:func:`wrap`): its targets and layouts are the
      pool's, its factors are not used.
    slots: how many adapters are resident at once.
    rank: the largest rank a slot holds (default: the template's largest).
    sources: ``{name: source}`` for :meth:`load` by name alone.
    loader: ``source -> wrapped tree``; by default a source that is a path is a
      :func:`save_adapter` checkpoint, restored with the ranks and alphas it was saved with
      (any rank up to the pool's) onto the template's base.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> make = lambda i: lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(i))
    >>> pool = lora_fn.AdapterPool(make(0), slots=2)
    >>> pool.load("a", make(1)), pool.load("b", make(2)), pool.load("c", make(3))
    (0, 1, 0)
    >>> pool.names, pool.ids(["b", None, "c"]).tolist()
    (['b', 'c'], [1, -1, 0])
  """

  def __init__(
    self,
    template: Any,
    slots: int,
    *,
    rank: int | None = None,
    sources: Mapping[str, Any] | None = None,
    loader: Callable[[Any], Any] | None = None,
  ):
    self.slots = _validate.positive_int("slots", slots)
    leaves = [x for _, x in _flat(template)[0] if is_lora(x)]
    if not leaves:
      raise ValueError("template holds no LoRA leaf; pass a tree returned by lorax_fn.wrap")
    self.rank = (
      _validate.positive_int("rank", rank) if rank is not None else max(x.rank for x in leaves)
    )
    self._template = template
    self._sources = dict(sources or {})
    self._loader = loader
    self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()
    flat, treedef = _flat(template)
    self.params = jax.tree_util.tree_unflatten(
      treedef, [_empty(x, self.slots, self.rank) for _, x in flat]
    )

  @property
  def names(self) -> list[str]:
    """The resident adapters, least recently used first."""
    return list(self._slot_of)

  def _load_tree(self, name: str, source: Any) -> Any:
    if source is None:
      if name not in self._sources:
        raise KeyError(f"no source for adapter {name!r}; give one, or sources={{{name!r}: ...}}")
      source = self._sources[name]
    if self._loader is not None:
      return self._loader(source)
    if isinstance(source, (str, os.PathLike)):
      return _restore(source, self._template)
    return source

  def load(self, name: str, source: Any = None) -> int:
    """Makes ``name`` resident and returns its slot (evicting the least recently used).

    Args:
      name: the adapter's name.
      source: a wrapped tree, or what the loader reads (a checkpoint directory by
        default); ``None`` looks ``name`` up in ``sources``. A resident adapter is reloaded
        only when a source is given.
    """
    if not isinstance(name, str) or not name:
      raise TypeError(f"name must be a non-empty str; got: {name!r}")
    if name in self._slot_of and source is None:
      self._slot_of.move_to_end(name)
      return self._slot_of[name]
    tree = self._load_tree(name, source)
    victim = None
    if name in self._slot_of:
      slot = self._slot_of[name]
    elif len(self._slot_of) < self.slots:
      used = set(self._slot_of.values())
      slot = next(k for k in range(self.slots) if k not in used)
    else:
      victim = next(iter(self._slot_of))
      slot = self._slot_of[victim]
    # set_adapter checks the tree first: a bad adapter leaves the pool as it was.
    self.params = set_adapter(self.params, slot, tree)
    if victim is not None:
      del self._slot_of[victim]
    self._slot_of[name] = slot
    self._slot_of.move_to_end(name)
    return slot

  def evict(self, name: str) -> None:
    """Frees ``name``'s slot: it becomes empty (rank and strength 0) until the next load."""
    if name not in self._slot_of:
      raise KeyError(f"adapter {name!r} is not resident; resident: {self.names}")
    slot = self._slot_of.pop(name)

    def empty(x: Any) -> Any:
      if not isinstance(x, LoraStack):
        return x
      zero = lambda v: v.at[slot].set(0.0)
      return dataclasses.replace(x, ranks=zero(x.ranks), strengths=zero(x.strengths))

    self.params = jax.tree.map(empty, self.params, is_leaf=lambda x: isinstance(x, LoraStack))

  def ids(self, names: Iterable[str | None]) -> np.ndarray:
    """The slot of each request's adapter (``None``: the base, ``-1``), loading as needed.

    Raises:
      ValueError: if the requests need more distinct adapters than there are slots.
    """
    names = list(names)
    wanted = list(dict.fromkeys(n for n in names if n is not None))  # first-seen order
    if len(wanted) > self.slots:
      raise ValueError(
        f"the requests need {len(wanted)} distinct adapters, but the pool has {self.slots} slots"
      )
    for n in wanted:  # touch the resident ones first, so loading never evicts a wanted one
      if n in self._slot_of:
        self._slot_of.move_to_end(n)
    slots = {n: self.load(n) for n in wanted}
    return np.asarray([-1 if n is None else slots[n] for n in names], np.int32)
