"""QLoRA memory and speed: base bytes, compiled-step temporaries and step time vs plain LoRA.

A stack of transformer-style linear layers (4 x 2048² by default, as in DESIGN.md §4):
bytes of the frozen base in bf16 vs NF4 + double quantisation vs int4 vs int8; the compiled
train step's temporary memory (``memory_analysis``) and median step time for plain LoRA vs
QLoRA NF4, interleaved; and the ratios.

    python benchmarks/qlora_memory.py [--layers 4] [--dim 2048] [--tokens 512] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import interleaved

import lorax_fn as lora_fn


def nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--tokens", type=int, default=512)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), args.layers + 2)
  base = {
    f"layer{i}": {"kernel": jax.random.normal(keys[i], (args.dim, args.dim)) * 0.02}
    for i in range(args.layers)
  }
  x = jax.random.normal(keys[-1], (args.tokens, args.dim))

  def model(params, x):
    for i in range(args.layers):
      x = x + jax.nn.gelu(x @ params[f"layer{i}"]["kernel"])
    return jnp.mean(x**2)

  bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
  quantized = {k: lora_fn.quantize(base, k, targets=("kernel",)) for k in ("nf4", "int4", "int8")}
  print(f"{args.layers} layers of {args.dim}x{args.dim}, {args.tokens} tokens, rank {args.rank}")
  print(f"base bytes: bf16 {nbytes(bf16):,}")
  for k, q in quantized.items():
    print(
      f"            {k:<4} {nbytes(q):,}  ({nbytes(q) / nbytes(bf16):.4f} x bf16, "
      f"{8 * nbytes(q) / (args.layers * args.dim**2):.3f} bits/param)"
    )

  def make_step(params):
    tx = lora_fn.optimizer(optax.adam(1e-3), params)

    def step(params, opt_state, x):
      trainable, frozen = lora_fn.split(params)
      loss, grads = jax.value_and_grad(
        lambda t: lora_fn.lora(model)(lora_fn.combine(t, frozen), x)
      )(trainable)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

    return jax.jit(step), tx.init(params)

  variants = {
    "LoRA": lora_fn.wrap(base, rank=args.rank, targets=("kernel",), key=keys[-2]),
    "QLoRA nf4": lora_fn.wrap(quantized["nf4"], rank=args.rank, targets=("kernel",), key=keys[-2]),
  }
  compiled, state, temp = {}, {}, {}
  for name, params in variants.items():
    step, opt_state = make_step(params)
    c = step.lower(params, opt_state, x).compile()
    temp[name] = c.memory_analysis().temp_size_in_bytes
    compiled[name], state[name] = c, (params, opt_state)

  def run(name: str) -> None:
    params, opt_state, _ = jax.block_until_ready(compiled[name](*state[name], x))
    state[name] = (params, opt_state)

  times = interleaved(run, list(variants), args.rounds)
  med = {n: statistics.median(v) for n, v in times.items()}
  for n in variants:
    print(f"{n:>9}: temp {temp[n] / 2**20:8.1f} MiB   median step {med[n] * 1e3:7.1f} ms")
  print(f"QLoRA/LoRA temp memory = {temp['QLoRA nf4'] / temp['LoRA']:.2f}  (target <= 1.5)")
  print(f"QLoRA/LoRA step time   = {med['QLoRA nf4'] / med['LoRA']:.2f}  (target <= 1.5)")


if __name__ == "__main__":
  main()
