"""Per-device parameter + optimizer-state bytes for ViT-B/16 LoRA on 1, 2, 4 and 8 devices.

The recipe of ``configs/vit_food101.py`` (q and v at rank 16, head trained, AdamW), placed with
``lorax_fn.shard`` under the default FSDP rule on a ``fsdp=N`` mesh of N virtual CPU devices,
and the optimizer state created sharded (``lorax_fn.state_shardings``). Bytes are read from
each device's addressable shards: the largest device is reported, and its ratio to one
device. ``data=8`` (pure data parallelism) and an NF4 (QLoRA) base are shown for comparison.

    PYTHONPATH=train python benchmarks/sharding.py
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import optax

try:
  import vit  # train/vit.py: run with PYTHONPATH=train
except ImportError as e:
  raise SystemExit(
    "run from the repository root as: PYTHONPATH=train python benchmarks/sharding.py"
  ) from e

import lorax_fn as lora_fn


def per_device(tree) -> dict[int, int]:
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
  return out


def measure(params, axes: str, n: int) -> tuple[int, int]:
  mesh = lora_fn.make_mesh(axes, devices=jax.devices()[:n])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", lora_fn.ShardingWarning)  # small leaves stay replicated
    placed = lora_fn.shard(params, mesh)
  trainable, _ = lora_fn.split(placed, trainable=("head",))
  tx = lora_fn.optimizer(optax.adamw(5e-3), placed, trainable=("head",))
  out = lora_fn.state_shardings(jax.eval_shape(tx.init, trainable), trainable)
  state = jax.jit(tx.init, out_shardings=out)(trainable)
  p, s = per_device(placed), per_device(state)
  worst = max(p, key=lambda d: p[d] + s.get(d, 0))
  return p[worst], s.get(worst, 0)


def main() -> None:
  if jax.device_count() < 8:
    sys.exit("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  model = vit.vit("B/16", num_classes=101)
  images = jnp.zeros((1, 224, 224, 3))
  base = jax.device_get(jax.jit(model.init)(jax.random.key(0), images))
  layouts = lora_fn.infer_layouts(model.apply, base, images)
  wrap = lambda b: lora_fn.wrap(
    b, rank=16, alpha=16.0, targets=("query", "value"), layouts=layouts, key=jax.random.key(1)
  )
  print(lora_fn.summary(wrap(base), trainable=("head",)).splitlines()[0])
  nf4 = lora_fn.quantize(
    base, "nf4", targets=("query", "key", "value", "out", "mlp_in", "mlp_out"), block_size=64
  )
  rows = [
    ("float32 base", wrap(base), "fsdp", (1, 2, 4, 8)),
    ("NF4 base", wrap(nf4), "fsdp", (1, 2, 4, 8)),
  ]
  rows.append(("float32 base, data parallel", wrap(base), "data", (8,)))
  print(
    f"{'base':<28} {'mesh':<8} {'params/device':>15} {'opt state/device':>17} "
    f"{'total':>15} {'vs 1':>6}"
  )
  for name, params, axis, sizes in rows:
    one = None
    for n in sizes:
      p, s = measure(params, f"{axis}={n}", n)
      one = one or (measure(params, f"{axis}=1", 1) if n != 1 else (p, s))
      ratio = (p + s) / sum(one)
      print(f"{name:<28} {axis}={n:<3} {p:>15,} {s:>17,} {p + s:>15,} {ratio:>6.3f}")


if __name__ == "__main__":
  main()
