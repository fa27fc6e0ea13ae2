"""Train-step time of the LoRA variants (DoRA, LoRA+, AdaLoRA) against plain LoRA.

The ViT-S/16-sized model of ``step_ratio.py`` (d=384, 12 layers, 6 heads, MLP 1536), batch 8,
224x224, rank-8 adapters on every attention (q, k, v, out) and MLP kernel, Adam, gradients for
the adapters only (split/combine). Variants are interleaved round by round (``_timing``) and
the ratios are of the median step times. Targets (issue 13): DoRA <= 1.3x LoRA (PEFT's DoRA is
commonly reported well above that), LoRA+ = 1.0x (it only changes learning rates), AdaLoRA
<= 1.2x.

    python benchmarks/variants.py [--rounds 7] [--batch 8]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import optax
from _timing import interleaved
from step_ratio import ViT

import lorax_fn as lora_fn

TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def make_step(model, tx, loss_of=None):
  """A jitted Adam step on the adapters of ``lora(model.apply)``; donates params and state.

  ``loss_of(params, trainable, loss)`` may add a regulariser (AdaLoRA's orthogonality term).
  """
  apply = lora_fn.lora(model.apply)

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, img, labels):
    trainable, frozen = lora_fn.split(params)

    def loss_fn(t):
      loss = xent(apply(lora_fn.combine(t, frozen), img), labels)
      return loss if loss_of is None else loss_of(params, t, loss)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rank", type=int, default=8)
  args = parser.parse_args()

  model = ViT()
  img = jax.random.normal(jax.random.key(1), (args.batch, 224, 224, 3))
  labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 101)
  base = model.init(jax.random.key(0), img[:1])
  wrap = functools.partial(lora_fn.wrap, base, rank=args.rank, targets=TARGETS)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each variant owns (and donates) its buffers

  # name -> (step, params, optimizer state); target: (comparison, ratio to plain LoRA).
  variants, targets = {}, {}

  def add(name, params, tx, target=None, loss_of=None):
    variants[name] = (make_step(model, tx, loss_of), (copy(params), tx.init(params)))
    if target is not None:
      targets[name] = target

  lora_params = wrap(key=jax.random.key(3))
  add("lora", lora_params, lora_fn.optimizer(optax.adam(1e-4), lora_params))

  dora_params = wrap(key=jax.random.key(3), dora=True)
  add("dora", dora_params, lora_fn.optimizer(optax.adam(1e-4), dora_params), ("<=", 1.3))

  plus = lora_fn.loraplus(optax.adam, 1e-4, ratio=16.0)
  add("loraplus", lora_params, lora_fn.optimizer(plus, lora_params), ("=", 1.0))

  # AdaLoRA: SVD-form leaves (rank = init_r) under its transformation mid-way through the
  # budget's fall (a new mask every step); the orthogonality term's gradient is added inside
  # the transformation, so no loss_of.
  ada_params = wrap(key=jax.random.key(3), adalora=True)
  inner = lora_fn.optimizer(optax.adam(1e-4), ada_params)
  ada_tx = lora_fn.adalora(inner, init_r=args.rank, target_r=args.rank // 2, total_step=10_000)
  add("adalora", ada_params, ada_tx, ("<=", 1.2))

  def run(name: str) -> None:
    step, state = variants[name]
    out = jax.block_until_ready(step(*state, img, labels))
    variants[name] = (step, out[:2])

  print(lora_fn.summary(lora_params).splitlines()[0], "(plain LoRA)")
  print(lora_fn.summary(dora_params).splitlines()[0], "(DoRA)")
  print(f"devices: {jax.devices()}  batch {args.batch}, 224x224, rank {args.rank}")
  names = list(variants)
  times = interleaved(run, names, args.rounds)
  med = {n: statistics.median(v) for n, v in times.items()}
  for n in names:
    print(f"{n:>9}: median {med[n] * 1e3:8.1f} ms/step  (min {min(times[n]) * 1e3:.1f})")
  for n, (op, want) in targets.items():
    ratio, best = med[n] / med["lora"], min(times[n]) / min(times["lora"])
    print(f"{n}/lora = {ratio:.3f}   (target {op} {want}; ratio of min times {best:.3f})")


if __name__ == "__main__":
  main()
