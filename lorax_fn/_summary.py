"""``summary``: PEFT's trainable-parameter line plus a table of the LoRA targets."""

from __future__ import annotations

import math
from typing import Any

import jax

from lorax_fn import _paths
from lorax_fn._leaves import is_adapter, is_lora, is_stack
from lorax_fn._partition import partition, trainable_mask
from lorax_fn._quant import is_quant


def _size(x: Any) -> int:
  return math.prod(getattr(x, "shape", ())) if hasattr(x, "shape") else 0


def summary(params: Any, *, trainable: _paths.Targets | None = None, bias: str = "none") -> str:
  """PEFT's ``print_trainable_parameters`` line followed by one row per LoRA target.

  Args:
    params: a wrapped pytree.
    trainable: extra fully trained leaves, as given to :func:`optimizer`.
    bias: bias mode, as given to :func:`optimizer`.

  Returns:
    The text, e.g. ``trainable params: 70 || all params: 140 || trainable%: 50.0000``
    then the table.

  Raises:
    ValueError: if nothing in ``params`` is trained (an unwrapped tree), or ``trainable``
      matches nothing.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"dense": {"kernel": jnp.ones((5, 7))}}, rank=2,
    ...                  targets=("dense",), key=jax.random.key(0))
    >>> print(lora_fn.summary(p))
    trainable params: 24 || all params: 59 || trainable%: 40.6780
    path          shape   layout      rank  alpha  params
    dense/kernel  (5, 7)  (in, out)      2    2.0      24
  """
  for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]:
    if is_adapter(x):
      x.check(_paths.path_str(path))  # a half of split has no w (or no a, b) to count
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  # A quantised base counts as the parameters it stands for, as PEFT counts 4-bit weights.
  total = sum(_size(x) for x in jax.tree.leaves(params, is_leaf=is_quant))
  on = sum(_size(x) for x in jax.tree.leaves(partition(params, mask)[0]))
  pct = 100.0 * on / total if total else 0.0
  line = f"trainable params: {on:,} || all params: {total:,} || trainable%: {pct:.4f}"
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]
  rows = [("path", "shape", "layout", "rank", "alpha", "params")]
  for path, x in flat:
    if is_stack(x):  # alphas are data here: the slots' ranks and scales vary
      rows.append(
        (
          _paths.path_str(path),
          str(x.shape),
          "(" + ", ".join(x.roles) + ")",
          f"{x.slots}x{x.rank}",
          "-",
          f"{_size(x.a) + _size(x.b):,}",
        )
      )
    elif is_lora(x):
      rows.append(
        (
          _paths.path_str(path),
          str(x.shape),
          "(" + ", ".join(x.roles) + ")",
          str(x.rank),
          f"{x.alpha:g}" if x.alpha != int(x.alpha) else f"{x.alpha:.1f}",
          f"{_size(x.a) + _size(x.b) + _size(x.m) + _size(x.e):,}",
        )
      )
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  right = (False, False, False, True, True, True)
  table = [
    "  ".join(
      c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right, strict=True)
    ).rstrip()
    for r in rows
  ]
  return "\n".join([line, *table])
