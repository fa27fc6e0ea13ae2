"""Inference with many adapters on one base: per-example adapters vs the base, merged, one.

ViT-S-sized model (d=384, 12 layers, 6 heads, MLP 1536, from ``step_ratio.py``) on 96x96
images (37 tokens), batch 32, rank-8 adapters on the query and value kernels:

* ``base``: the plain model; ``merged``: one adapter merged into the weights;
* ``one``: one unmerged adapter through ``lora_fn.lora``;
* ``mixed8`` / ``mixed32``: 8 or 32 stacked adapters, a random one per example
  (``adapter_ids``).

Variants are interleaved round by round and the ratios are of median times. Then it swaps
adapters into slots (``set_adapter``) and changes strengths, and reports the swap latency and
how many times the jitted step compiled.

    python benchmarks/many_adapters.py [--rounds 7] [--batch 32] [--image 96]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved
from step_ratio import ViT

import lorax_fn as lora_fn

TARGETS = ("query", "value")


def _adapter(params, i):
  p = lora_fn.wrap(params, rank=8, alpha=16.0, targets=TARGETS, key=jax.random.key(i))
  return jax.tree.map(
    lambda x: (
      dataclasses.replace(x, b=0.01 * jax.random.normal(jax.random.key(i), x.b.shape))
      if lora_fn.is_lora(x)
      else x
    ),
    p,
    is_leaf=lora_fn.is_lora,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image", type=int, default=96)
  args = parser.parse_args()

  model = ViT()
  x = jax.random.normal(jax.random.key(0), (args.batch, args.image, args.image, 3))
  params = model.init(jax.random.key(1), x[:1])
  adapters = [_adapter(params, i) for i in range(32)]
  stacks = {n: lora_fn.stack_adapters(adapters[:n]) for n in (8, 32)}
  ids = {
    n: jnp.asarray(np.random.default_rng(n).integers(0, n, args.batch), jnp.int32) for n in (8, 32)
  }

  plain = jax.jit(model.apply)
  one = jax.jit(lora_fn.lora(model.apply))
  mixed = jax.jit(lambda p, x, ids: lora_fn.lora(model.apply)(p, x, adapter_ids=ids))
  merged = lora_fn.merge(adapters[0])
  runs = {
    "base": lambda: plain(params, x),
    "merged": lambda: plain(merged, x),
    "one": lambda: one(adapters[0], x),
    "mixed8": lambda: mixed(stacks[8], x, ids[8]),
    "mixed32": lambda: mixed(stacks[32], x, ids[32]),
  }
  times = interleaved(lambda n: jax.block_until_ready(runs[n]()), list(runs), args.rounds)
  med = {n: statistics.median(t) for n, t in times.items()}
  print(
    f"ViT-S-sized, batch {args.batch}, {args.image}x{args.image}, rank 8 on q and v; "
    f"median of {args.rounds} interleaved rounds"
  )
  targets = {"merged": 1.02, "one": 1.15, "mixed8": 1.3, "mixed32": 1.5}
  for name in runs:
    ratio = med[name] / med["base"]
    target = f"  (target <= {targets[name]})" if name in targets else ""
    print(f"  {name:8s} {1e3 * med[name]:8.1f} ms  {ratio:5.2f}x base{target}")

  # Hot-swaps and strength changes: device transfers, no recompilation.
  stacked = stacks[8]
  latencies = []
  for i in range(5):
    t = time.perf_counter()
    stacked = jax.block_until_ready(lora_fn.set_adapter(stacked, i % 8, adapters[8 + i]))
    latencies.append(time.perf_counter() - t)
    stacked = lora_fn.set_strength(stacked, np.linspace(0.5, 1.5, 8))
    jax.block_until_ready(mixed(stacked, x, ids[8]))
  print(
    f"  swap: median {1e3 * statistics.median(latencies):.1f} ms per adapter; the mixed step "
    f"compiled {mixed._cache_size()} times for 2 stack sizes (5 swaps, 5 strength changes)"
  )


if __name__ == "__main__":
  main()
