"""``summary``: PEFT's line and the per-target table."""

import jax
import jax.numpy as jnp

import lorax_fn as lora_fn


def test_summary_counts_like_peft():
  params = {
    "enc": {"query": {"kernel": jnp.ones((5, 2, 3)), "bias": jnp.zeros((2, 3))}},
    "head": {"kernel": jnp.ones((6, 11)), "bias": jnp.zeros(11)},
  }
  p = lora_fn.wrap(params, rank=2, targets=("query",), key=jax.random.key(0))
  text = lora_fn.summary(p, trainable=("head",))
  lora = 5 * 2 + 2 * 6
  base = 30 + 6 + 66 + 11
  head = 66 + 11
  total = base + lora
  first, header, row = text.splitlines()
  assert first == (
    f"trainable params: {lora + head:,} || all params: {total:,} || "
    f"trainable%: {100 * (lora + head) / total:.4f}"
  )
  assert header.split() == ["path", "shape", "layout", "rank", "alpha", "params"]
  assert row.split() == [
    "enc/query/kernel",
    "(5,",
    "2,",
    "3)",
    "(in,",
    "out,",
    "out)",
    "2",
    "2.0",
    str(lora),
  ]
