"""``optimizer``: an optax transformation that trains the adapters and nothing else."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorax_fn import _paths
from lorax_fn._adalora import AdaLoraState
from lorax_fn._leaves import is_adapter, is_lora, is_stack
from lorax_fn._partition import _is_mask_leaf, combine, partition, trainable_mask


class LoraOptState(NamedTuple):
  """State of :func:`optimizer`: the inner state, over the trainable leaves only."""

  inner: optax.OptState


def optimizer(
  tx: optax.GradientTransformation,
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
) -> optax.GradientTransformation:
  """Wraps ``tx`` so that it updates the LoRA factors and the chosen extra leaves only.

  Frozen leaves get no optimiser state at all, unlike ``optax.masked``, which also passes
  unmasked updates through unchanged instead of freezing them. ``update`` accepts either
  the full gradient tree or the trainable tree from :func:`split` (``None`` at frozen
  leaves); frozen positions come back as ``None`` in the second case and as zeros in the
  first, so ``optax.apply_updates`` works on the tree it was given.

  Args:
    tx: the optax transformation for the trainable leaves.
    params: the wrapped parameters (only their structure and LoRA leaves are read).
    trainable: extra leaves to train fully, e.g. a classifier head ``("head",)``
      (PEFT's ``modules_to_save``): names, a regex or a ``(path, leaf) -> bool``.
    bias: ``"none"``, ``"all"`` or ``"lora_only"`` (PEFT's bias modes).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    TypeError: if ``tx`` is not an optax transformation (e.g. the factory ``optax.adam``).
    ValueError: if ``bias`` is unknown or ``trainable`` matches nothing.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",),
    ...                  key=jax.random.key(0))
    >>> tx = lora_fn.optimizer(optax.adam(1e-3), p)
    >>> [x.shape for x in jax.tree.leaves(tx.init(p))]  # count, then mu and nu of a, b
    [(), (2, 5), (2, 7), (2, 5), (2, 7)]
  """
  if not isinstance(tx, optax.GradientTransformation):
    made = " (a function that makes one: call it, e.g. optax.adam(1e-3))" if callable(tx) else ""
    raise TypeError(f"tx must be an optax.GradientTransformation{made}; got: {tx!r}")
  mask = trainable_mask(params, trainable=trainable, bias=bias)

  def init(params: Any) -> LoraOptState:
    _check_like("params", params, mask)
    return LoraOptState(tx.init(partition(params, mask)[0]))

  def update(updates: Any, state: LoraOptState, params: Any = None) -> tuple[Any, LoraOptState]:
    if not isinstance(state, LoraOptState):
      hint = ""
      if isinstance(state, AdaLoraState):
        hint = (
          " (an AdaLoraState is the state of lorax_fn.adalora(tx, ...), which runs this "
          "optimizer inside: call the adalora transformation's update with it)"
        )
      raise TypeError(
        "state must be the LoraOptState that this optimizer's init returned; got: "
        f"{type(state).__name__}{hint}"
      )
    _check_like("updates", updates, mask)
    if params is not None:
      _check_like("params", params, mask)
    train_updates, frozen_updates = partition(updates, mask)
    train_params = None if params is None else partition(params, mask)[0]
    new_updates, inner = tx.update(train_updates, state.inner, train_params)
    zeros = jax.tree.map(jnp.zeros_like, frozen_updates)
    return combine(new_updates, zeros), LoraOptState(inner)

  return optax.GradientTransformation(init, update)


def _check_like(what: str, tree: Any, mask: Any) -> None:
  """Raises ``ValueError`` naming the first path where ``tree`` does not fit the optimizer."""
  mask_flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_mask_leaf)[0]
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_adapter(x))[0]
  expected = {_paths.path_str(p): m for p, m in mask_flat}
  got = {_paths.path_str(p): x for p, x in flat}
  # A None is a gap of split's halves; the optimizer built from a half has the gap too.
  got = {p: x for p, x in got.items() if x is not None or p in expected}
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(
      f"{what} must have the structure of the params given to lorax_fn.optimizer; missing: "
      f"{missing[:5]}, not expected: {extra[:5]}"
    )
  for path, m in expected.items():
    x = got[path]
    if type(m) is not type(x) and (is_adapter(m) or is_adapter(x)):
      kind = ("a LoRA stack" if is_stack(m) else "a LoRA leaf") if is_adapter(m) else "a plain leaf"
      raise ValueError(
        f"{what} at {path!r} must be {kind}, as in the params given to lorax_fn.optimizer; "
        f"got: {type(x).__name__}"
      )
    if is_adapter(m) and (m.rank, m.roles) != (x.rank, x.roles):
      raise ValueError(
        f"{what} at {path!r} has rank {x.rank} and layout {x.roles}; the optimizer was built "
        f"for rank {m.rank} and layout {m.roles}"
      )
    if is_lora(m) and x.a is not None:
      _check_variant(what, path, m, x)
  if what == "updates":
    _check_split_form(expected, got)


_VARIANTS = {
  "m": "a DoRA leaf (with a magnitude m)",
  "e": "an AdaLoRA leaf (with singular values e: wrap(..., adalora=True))",
}


def _check_variant(what: str, path: str, m: Any, x: Any) -> None:
  """A DoRA or AdaLoRA leaf where the optimizer was built for a plain one, or the reverse."""
  for field, kind in _VARIANTS.items():
    if (getattr(m, field) is None) != (getattr(x, field) is None):
      kinds = ("a plain LoRA leaf", kind)
      raise ValueError(
        f"{what} at {path!r} is {kinds[getattr(x, field) is not None]}; the optimizer was "
        f"built for {kinds[getattr(m, field) is not None]}"
      )


def _check_split_form(expected: dict[str, Any], got: dict[str, Any]) -> None:
  """Gradients of ``split``'s trainable half must have ``None`` exactly where it is frozen.

  Otherwise ``split`` and the optimizer were given different ``trainable=``, and a leaf one
  of them trains would silently never change.
  """
  plain = [p for p, m in expected.items() if not is_adapter(m)]
  if not any(got[p] is None for p in plain):
    return  # the full gradient tree: frozen leaves have gradients, which are dropped
  for p in plain:
    if expected[p] and got[p] is None:
      raise ValueError(
        f"updates at {p!r} is None, but the optimizer trains that leaf: give split() the "
        "same trainable= (and bias=) as lorax_fn.optimizer"
      )
    if not expected[p] and got[p] is not None:
      raise ValueError(
        f"updates at {p!r} has a gradient, but the optimizer does not train that leaf: give "
        "split() the same trainable= (and bias=) as lorax_fn.optimizer"
      )
