"""``optimizer``: an optax transformation that trains the adapters and nothing else."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorax_fn import _paths
from lorax_fn._partition import combine, partition, trainable_mask


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
    return LoraOptState(tx.init(partition(params, mask)[0]))

  def update(updates: Any, state: LoraOptState, params: Any = None) -> tuple[Any, LoraOptState]:
    train_updates, frozen_updates = partition(updates, mask)
    train_params = None if params is None else partition(params, mask)[0]
    new_updates, inner = tx.update(train_updates, state.inner, train_params)
    zeros = jax.tree.map(jnp.zeros_like, frozen_updates)
    return combine(new_updates, zeros), LoraOptState(inner)

  return optax.GradientTransformation(init, update)
