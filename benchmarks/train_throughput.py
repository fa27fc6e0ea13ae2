"""Images/s of the jitted train step for ViT-B/16 at batch 8: LoRA (q, v rank 16 + head) vs full.

The LoRA step is the one ``train/run.py`` runs (``lorax_fn.lora`` + ``split``/``combine`` +
``lorax_fn.optimizer``, donated state); full fine-tuning is AdamW on every parameter. The
variants alternate round by round; medians are printed.

    PYTHONPATH=train python benchmarks/train_throughput.py [--rounds 5] [--batch 8]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import optax

try:
  import vit  # train/vit.py: run with PYTHONPATH=train
except ImportError as e:
  raise SystemExit(
    "run from the repository root: PYTHONPATH=train python benchmarks/train_throughput.py"
  ) from e
from _timing import interleaved

import lorax_fn as lora_fn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()

  model = vit.vit("B/16", num_classes=101)
  images = jax.random.uniform(jax.random.key(1), (args.batch, 224, 224, 3), minval=-1, maxval=1)
  labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 101)
  base = jax.jit(model.init)(jax.random.key(0), images[:1])

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  full_tx = optax.adamw(1e-4)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(params, opt_state, images, labels):
    grads = jax.grad(lambda p: xent(model.apply(p, images), labels))(params)
    updates, opt_state = full_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  layouts = lora_fn.infer_layouts(model.apply, base, images[:1])
  params = lora_fn.wrap(
    base, rank=16, alpha=16.0, targets=("query", "value"), layouts=layouts, key=jax.random.key(3)
  )
  lora_tx = lora_fn.optimizer(optax.adamw(5e-3), params, trainable=("head",))
  trainable, frozen = lora_fn.split(params, trainable=("head",))
  trainable = jax.tree.map(jnp.copy, trainable)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def lora_step(trainable, opt_state, images, labels):
    def loss_fn(t):
      return xent(lora_fn.lora(model.apply)(lora_fn.combine(t, frozen), images), labels)

    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = lora_tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  print(lora_fn.summary(params, trainable=("head",)).splitlines()[0])
  state = {
    "full": (jax.tree.map(jnp.copy, base), full_tx.init(base)),
    "lora": (trainable, lora_tx.init(trainable)),
  }
  steps = {"full": full_step, "lora": lora_step}

  def run(name: str) -> None:
    state[name] = jax.block_until_ready(steps[name](*state[name], images, labels))

  times = interleaved(run, list(steps), args.rounds)
  ips = {n: args.batch / statistics.median(v) for n, v in times.items()}
  for n in steps:
    print(f"{n:>4}: {ips[n]:6.2f} images/s  (median step {statistics.median(times[n]):.2f}s)")
  print(f"LoRA/full throughput = {ips['lora'] / ips['full']:.2f}x")


if __name__ == "__main__":
  main()
