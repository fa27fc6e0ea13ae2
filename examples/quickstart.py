"""Quickstart: LoRA-adapt a small Flax transformer to a shifted task in a few seconds on CPU.

The task is honest and checkable: a "teacher" is the base model plus a hidden low-rank
change of its attention and MLP kernels; the student starts from the base model and
learns rank-4 adapters through ``lora_fn.lora`` while every base weight stays frozen.

    python examples/quickstart.py
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lorax_fn as lora_fn


class Block(nn.Module):
  dim: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32)(x)
    for _ in range(2):
      x = Block()(x)
    return nn.Dense(1)(x.mean(axis=1))


def main() -> None:
  model = Model()
  k_init, k_data, k_teacher, k_lora = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k_data, (256, 8, 16))
  params = model.init(k_init, x[:1])
  # A regex over "/"-joined paths: q and v projections and both MLP kernels of each block.
  targets = r".*Block_\d/(MultiHeadDotProductAttention_0/(query|value)|Dense_[01])/kernel"

  # The teacher: the base plus a hidden rank-2 change of the targeted kernels.
  teacher = lora_fn.wrap(params, rank=2, targets=targets, key=k_teacher)
  teacher = jax.tree.map(
    lambda l: (
      dataclasses.replace(l, b=0.3 * jax.random.normal(k_teacher, l.b.shape))
      if lora_fn.is_lora(l)
      else l
    ),
    teacher,
    is_leaf=lora_fn.is_lora,
  )
  y = model.apply(lora_fn.merge(teacher), x)

  params = lora_fn.wrap(params, rank=4, targets=targets, key=k_lora)
  print(lora_fn.summary(params))
  tx = lora_fn.optimizer(optax.adam(3e-3), params)
  opt_state = tx.init(params)
  apply = lora_fn.lora(model.apply)

  @jax.jit
  def step(params, opt_state):
    trainable, frozen = lora_fn.split(params)
    loss_fn = lambda t: jnp.mean((apply(lora_fn.combine(t, frozen), x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  start = time.perf_counter()
  for i in range(201):
    params, opt_state, loss = step(params, opt_state)
    if i % 40 == 0:
      print(f"step {i:3d}  loss {float(loss):.5f}")
  print(
    f"trained 200 LoRA steps in {time.perf_counter() - start:.1f}s; "
    f"merged model loss {float(jnp.mean((model.apply(lora_fn.merge(params), x) - y) ** 2)):.5f}"
  )


if __name__ == "__main__":
  main()
