"""``loraplus``: LoRA+ learning rates (B faster than A), as PEFT's ``create_loraplus_optimizer``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from lorax_fn import _paths, _torch_layout, _validate
from lorax_fn._leaves import data_fields, is_adapter, trainable_fields

GROUPS = ("lora_A", "lora_B", "lora_B_no_decay", "embedding", "frozen")
"""Labels of :func:`loraplus_labels`, PEFT's parameter groups (``frozen``: no update)."""

_NO_DECAY = ("bias", "scale")  # biases and Flax norms' weights: PEFT's no-decay parameters


def loraplus_labels(params: Any) -> Any:
  """PEFT's LoRA+ group of every array of ``params`` (or of its trainable half).

  ``lora_A``: A factors and other trainable arrays of 2+ axes (a trained head's kernel, a
  ``Conv2d``'s DoRA magnitude, PyTorch's ``(1, out, 1, 1)``); ``lora_B``: B factors, DoRA
  magnitudes and other 1-D arrays; ``lora_B_no_decay``: the 1-D ones that are biases or norm
  weights; ``embedding``: an embedding's A and B; ``frozen``: a base ``w`` and a stack's
  scales, ranks and strengths. A leaf named ``bias`` or ``scale`` counts as
  1-D whatever its stacked (``nn.scan``) axes: PyTorch has one per layer.
  """

  def one(path: Any, x: Any) -> Any:
    name = _paths.path_str(path).rsplit("/", 1)[-1]
    if not is_adapter(x):
      if np.ndim(x) <= 1 or name in _NO_DECAY:
        return "lora_B_no_decay" if "bias" in name or name == "scale" else "lora_B"
      return "lora_A"
    kind = _torch_layout.kind(name, [r for r in x.roles if r != "stack"])
    marks = trainable_fields(x)

    def label(field: str) -> str | None:
      if getattr(x, field) is None:
        return None
      if not marks[field]:
        return "frozen"
      # PEFT groups an embedding's DoRA magnitude by its own module (a DoRA layer, not the
      # Embedding): 1-D, so with B.
      if kind == _torch_layout.EMBEDDING and field != "m":
        return "embedding"
      if field == "b" or (field == "m" and kind != _torch_layout.CONV2D):
        return "lora_B"
      return "lora_A"

    return dataclasses.replace(x, **{f: label(f) for f in data_fields(x)})

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_adapter)


def _rate(what: str, value: Any) -> Any:
  if callable(value):
    return value
  return _validate.positive_number(what, value, " or an optax schedule")


def _times(value: Any, factor: float) -> Any:
  if callable(value):
    return lambda count: factor * value(count)
  return factor * value


def loraplus(
  tx_factory: Callable[..., optax.GradientTransformation],
  learning_rate: float | optax.Schedule,
  *,
  ratio: float = 16.0,
  embedding_lr: float | optax.Schedule = 1e-6,
  weight_decay: float | None = None,
  **kwargs: Any,
) -> optax.GradientTransformation:
  """LoRA+: B (and DoRA's magnitudes) learn at ``ratio × learning_rate``, A at ``learning_rate``.

  PEFT's ``create_loraplus_optimizer(model, optimizer_cls, lr=, loraplus_lr_ratio=)``: one
  ``tx_factory`` per parameter group, with PEFT's groups: ``learning_rate`` for A factors and
  other trainable arrays of 2+ axes (a trained head's kernel; a ``Conv2d``'s DoRA magnitude,
  which PyTorch holds as ``(1, out, 1, 1)``); ``ratio × learning_rate`` for B factors, DoRA
  magnitudes (an embedding's too) and other 1-D arrays (biases, norm weights: these without
  weight decay); and ``embedding_lr`` for an embedding's A and B. Every other setting is the
  same for all groups.
  Give it to :func:`lorax_fn.optimizer`, which passes on the trainable arrays only (the
  labels would otherwise train every plain array of ``params``).

  Args:
    tx_factory: an optax factory taking ``learning_rate=`` (``optax.adamw``, ``optax.adam``,
      ``optax.sgd``, ...).
    learning_rate: A's learning rate, a number or an optax schedule.
    ratio: ``η_B / η_A`` (PEFT's ``loraplus_lr_ratio``; the paper suggests 16 and at least 1).
    embedding_lr: the learning rate of embeddings' adapters (PEFT's ``loraplus_lr_embedding``).
    weight_decay: passed as ``weight_decay=`` to every group but ``lora_B_no_decay`` (which
      gets 0), as PEFT's ``loraplus_weight_decay``; ``None`` passes none (the factory's own
      default everywhere), for transformations without one such as ``optax.adam``.
    **kwargs: other settings of ``tx_factory`` (``b1``, ``eps``, ...), the same for all groups.

  Returns:
    An ``optax.GradientTransformation`` over the trainable tree.

  Raises:
    TypeError: ``tx_factory`` is no factory (e.g. an already built transformation), or it
      rejects the settings (named).
    ValueError: a learning rate, ``ratio`` or ``weight_decay`` out of range.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",),
    ...                  key=jax.random.key(0))
    >>> tx = lora_fn.optimizer(lora_fn.loraplus(optax.sgd, 0.1, ratio=4.0), p)
    >>> grads = jax.tree.map(jnp.ones_like, p)
    >>> updates, _ = tx.update(grads, tx.init(p), p)
    >>> round(float(updates["k"].a[0, 0]), 6), round(float(updates["k"].b[0, 0]), 6)
    (-0.1, -0.4)
  """
  if isinstance(tx_factory, optax.GradientTransformation) or not callable(tx_factory):
    raise TypeError(
      "tx_factory must be a function that makes an optax transformation from learning_rate=, "
      f"e.g. optax.adamw (not optax.adamw(1e-3)); got: {tx_factory!r}"
    )
  learning_rate = _rate("learning_rate", learning_rate)
  embedding_lr = _rate("embedding_lr", embedding_lr)
  ratio = _validate.positive_number("ratio", ratio)
  if weight_decay is not None:
    value = _validate._scalar(weight_decay)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"weight_decay must be a number >= 0 (or None); got: {weight_decay!r}")
    weight_decay = float(value)
  settings = {
    "lora_A": (learning_rate, weight_decay),
    "lora_B": (_times(learning_rate, ratio), weight_decay),
    "lora_B_no_decay": (_times(learning_rate, ratio), None if weight_decay is None else 0.0),
    "embedding": (embedding_lr, weight_decay),
  }
  transforms = {"frozen": optax.set_to_zero()}
  for group, (lr, wd) in settings.items():
    extra = {} if wd is None else {"weight_decay": wd}
    try:
      tx = tx_factory(learning_rate=lr, **extra, **kwargs)
    except TypeError as e:
      names = ", ".join(f"{k}=" for k in [*extra, *kwargs])
      hint = " (weight_decay=None passes none)" if extra else ""
      raise TypeError(
        f"tx_factory(learning_rate=..., {names}) failed for the {group} group: {e}{hint}"
      ) from e
    if not isinstance(tx, optax.GradientTransformation):
      raise TypeError(
        f"tx_factory must return an optax.GradientTransformation; got: {type(tx).__name__}"
      )
    transforms[group] = tx
  return optax.multi_transform(transforms, loraplus_labels)
