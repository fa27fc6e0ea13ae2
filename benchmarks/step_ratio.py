"""Train-step time of LoRA through ``lora_fn.lora`` vs full fine-tuning vs the floor.

ViT-S/16-sized Flax model (d=384, 12 layers, 6 heads, MLP 1536), batch 8, 224x224, rank-8
LoRA on every attention (q, k, v, out) and MLP kernel. The floor is forward plus the
input-gradient backward pass only (gradients of the activations through every block, none for
any parameter): the work no LoRA step can avoid. Variants are
interleaved round by round (in a rotating order) so machine noise hits all of them alike;
the ratios are of the median step times.

    python benchmarks/step_ratio.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _timing import interleaved

import lorax_fn as lora_fn


class Block(nn.Module):
  dim: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.mlp, name="mlp_in")(h)
    return x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(h, approximate=False))


class ViT(nn.Module):
  dim: int = 384
  depth: int = 12
  heads: int = 6
  mlp: int = 1536
  patch: int = 16
  classes: int = 101

  @nn.compact
  def __call__(self, img, tokens_delta=None):
    x = nn.Conv(self.dim, (self.patch,) * 2, strides=(self.patch,) * 2, name="embed")(img)
    x = x.reshape(x.shape[0], -1, self.dim)
    if tokens_delta is not None:  # lets the floor differentiate w.r.t. the token activations
      x = x + tokens_delta
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.mlp, name=f"block{i}")(x)
    return nn.Dense(self.classes, name="head")(nn.LayerNorm()(x[:, 0]))


def _run(variants: dict, name: str, *batch) -> None:
  """One step; train steps donate their state, so the new state replaces the old."""
  fn, a = variants[name]
  out = jax.block_until_ready(fn(*a, *batch))
  if name != "floor":
    variants[name] = (fn, out[:2])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rank", type=int, default=8)
  args = parser.parse_args()

  model = ViT()
  img = jax.random.normal(jax.random.key(1), (args.batch, 224, 224, 3))
  labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 101)
  base = model.init(jax.random.key(0), img[:1])

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # Full fine-tuning: gradients and Adam for every parameter.
  full_tx = optax.adam(1e-4)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def full_step(params, opt_state, img, labels):
    loss, grads = jax.value_and_grad(lambda p: xent(model.apply(p, img), labels))(params)
    updates, opt_state = full_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # LoRA through lora_fn.lora: gradients only for the adapters (split/combine).
  targets = ("query", "key", "value", "out", "mlp_in", "mlp_out")
  lparams = lora_fn.wrap(base, rank=args.rank, targets=targets, key=jax.random.key(3))
  lora_tx = lora_fn.optimizer(optax.adam(1e-4), lparams)
  apply = lora_fn.lora(model.apply)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def lora_step(params, opt_state, img, labels):
    trainable, frozen = lora_fn.split(params)
    loss_fn = lambda t: xent(apply(lora_fn.combine(t, frozen), img), labels)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = lora_tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  # Floor: forward plus the backward pass for the activations only (gradient w.r.t. the
  # patch tokens entering the first block), no parameter gradients and no optimizer.
  @jax.jit
  def floor_step(params, delta, img, labels):
    return jax.value_and_grad(lambda d: xent(model.apply(params, img, d), labels))(delta)

  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each variant owns (and donates) its buffers
  variants = {
    "full": (full_step, (copy(base), full_tx.init(base))),
    "lora": (lora_step, (copy(lparams), lora_tx.init(lparams))),
    "floor": (floor_step, (base, jnp.zeros((args.batch, 196, model.dim)))),
  }
  print(lora_fn.summary(lparams).splitlines()[0])
  print(f"devices: {jax.devices()}  batch {args.batch}, 224x224, rank {args.rank}")
  names = list(variants)
  times = interleaved(lambda name: _run(variants, name, img, labels), names, args.rounds)
  med = {n: statistics.median(v) for n, v in times.items()}
  for n in names:
    print(f"{n:>5}: median {med[n] * 1e3:8.1f} ms/step  (min {min(times[n]) * 1e3:.1f})")
  print(f"LoRA/full  = {med['lora'] / med['full']:.3f}   (target <= 0.78)")
  print(f"LoRA/floor = {med['lora'] / med['floor']:.3f}   (target <= 1.12)")
  print(f"floor/full = {med['floor'] / med['full']:.3f}")
  # This machine is noisy; the ratio of the fastest steps is a second, noise-robust view.
  best = {n: min(v) for n, v in times.items()}
  print(
    f"(ratios of min times: LoRA/full {best['lora'] / best['full']:.3f}, "
    f"LoRA/floor {best['lora'] / best['floor']:.3f})"
  )


if __name__ == "__main__":
  main()
