"""A small QLoRA/LoRA train loop on a device mesh, shared by the multi-device tests.

Run as a script in a fresh process (the tests set ``XLA_FLAGS`` first), it trains on one
device and on several meshes and writes the results to ``argv[1]`` (an ``.npz``).
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lorax_fn as lora_fn

TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
    return x + nn.Dense(16, name="mlp_out")(nn.gelu(nn.Dense(48, name="mlp_in")(nn.LayerNorm()(x))))


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name="embed")(x)
    x = Block(name="b0")(Block(name="b1")(x))
    return nn.Dense(5, name="head")(x.mean(axis=1))


def setup(kind: str | None = None) -> tuple[Model, np.ndarray, np.ndarray, Any]:
  """Model, a global batch (8 examples) and wrapped (optionally quantised) parameters."""
  model = Model()
  x = np.asarray(jax.random.normal(jax.random.key(1), (8, 7, 9)))
  y = np.asarray(jax.random.randint(jax.random.key(4), (8,), 0, 5))
  base = model.init(jax.random.key(0), x)
  if kind is not None:
    base = lora_fn.quantize(base, kind, targets=TARGETS, block_size=32)
  params = lora_fn.wrap(base, rank=4, targets=TARGETS, key=jax.random.key(5))
  return model, x, y, jax.device_get(params)


def train(model, x, y, params, mesh, steps: int, rules: Any = "fsdp"):
  """``steps`` Adam steps on ``mesh``: (losses, placed trainable, frozen, opt state)."""
  params = lora_fn.shard(params, mesh, rules, min_size=1)
  trainable, frozen = lora_fn.split(params, trainable=("head",))
  tx = lora_fn.optimizer(optax.adam(3e-2), params, trainable=("head",))
  state_shardings = lora_fn.state_shardings(jax.eval_shape(tx.init, trainable), trainable)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(trainable)
  batch_sharding = lora_fn.batch_sharding(mesh)
  xs, ys = (_global(a, batch_sharding) for a in (x, y))
  shardings = lambda t: jax.tree.map(lambda a: a.sharding, t)
  apply = lora_fn.lora(model.apply)

  def step(trainable, opt_state, frozen, x, y):
    def loss_fn(t):
      logits = apply(lora_fn.combine(t, frozen), x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  replicated = NamedSharding(mesh, P())
  step = jax.jit(
    step,
    in_shardings=(
      shardings(trainable),
      shardings(opt_state),
      shardings(frozen),
      batch_sharding,
      batch_sharding,
    ),
    out_shardings=(shardings(trainable), shardings(opt_state), replicated),
    donate_argnums=(0, 1),
  )
  losses = []
  for _ in range(steps):
    trainable, opt_state, loss = step(trainable, opt_state, frozen, xs, ys)
    losses.append(float(loss))
  return losses, trainable, frozen, opt_state


def _global(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global batch from this process's rows (each process holds its slice of ``a``)."""
  n = jax.process_count()
  rows = len(a) // n
  local = a[jax.process_index() * rows : (jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding, local, a.shape)


def per_device_bytes(tree: Any) -> dict[int, int]:
  """Bytes each device holds of ``tree``'s arrays."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
  return out


def flat(tree: Any) -> dict[str, np.ndarray]:
  from jax.experimental import multihost_utils

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(v, tiled=True))
    for p, v in leaves
  }


MESHES = {"8x1": "data=8,fsdp=1", "2x4": "data=2,fsdp=4", "1x8": "data=1,fsdp=8"}


def main(out: str) -> None:
  results: dict[str, Any] = {}
  for kind in (None, "nf4"):
    tag = kind or "f32"
    model, x, y, params = setup(kind)
    one = lora_fn.make_mesh("data=1", devices=jax.devices()[:1])
    losses, trainable, _, _ = train(model, x, y, params, one, 5)
    results[f"{tag}/1/losses"] = np.asarray(losses)
    results |= {f"{tag}/1/{k}": v for k, v in flat(trainable).items()}
    for name, axes in MESHES.items():
      mesh = lora_fn.make_mesh(axes)
      losses, trainable, frozen, opt_state = train(model, x, y, params, mesh, 5)
      results[f"{tag}/{name}/losses"] = np.asarray(losses)
      results |= {f"{tag}/{name}/{k}": v for k, v in flat(trainable).items()}
      # Frozen base bytes per device, and the bytes of the leaves the rule split.
      results[f"{tag}/{name}/frozen_bytes"] = np.asarray(list(per_device_bytes(frozen).values()))
      split = [a for a in jax.tree.leaves(frozen) if any(e is not None for e in a.sharding.spec)]
      results[f"{tag}/{name}/split_total"] = np.asarray(sum(a.nbytes for a in split))
      results[f"{tag}/{name}/split_per_device"] = np.asarray(list(per_device_bytes(split).values()))
      results[f"{tag}/{name}/opt_bytes"] = np.asarray(list(per_device_bytes(opt_state).values()))
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1])
