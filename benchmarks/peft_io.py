"""PEFT export and import of the ViT-B/16 recipe's adapter: bytes and seconds.

The adapter of ``configs/vit_food101.py`` (q and v at rank 16 on ViT-B/16, the 101-class
head trained) written with ``lorax_fn.save_peft`` and read back onto the base with
``lorax_fn.load_peft``, both through ``hf_vit.peft_modules``, interleaved. Neither reads or
writes the base's weights, so the base is numpy zeros (allocated lazily); factors and head
are random. Reports the adapter file's bytes against the raw bytes of the factors and the
head (target: within 1% + 16 KiB) and the median export + import time (target: < 1 s).

    PYTHONPATH=train python benchmarks/peft_io.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved

try:  # train/: run with PYTHONPATH=train
  import hf_vit
  import vit
except ImportError as e:
  raise SystemExit(
    "run from the repository root as: PYTHONPATH=train python benchmarks/peft_io.py"
  ) from e

import lorax_fn as lora_fn


def adapter(model: vit.ViT) -> tuple[dict, dict]:
  """``(base, params)``: the zero base and it wrapped, with random factors and head."""
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  base = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params = lora_fn.wrap(
    base, rank=16, alpha=16.0, targets=("query", "value"), key=jax.random.key(1)
  )
  rng = np.random.default_rng(0)
  normal = lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), jnp.float32)
  params = jax.tree.map(
    lambda x: dataclasses.replace(x, b=normal(x.b)) if lora_fn.is_lora(x) else x,
    params,
    is_leaf=lora_fn.is_lora,
  )
  params["head"] = jax.tree.map(normal, params["head"])
  return base, params


def raw_bytes(params: dict) -> int:
  """Bytes of the arrays an adapter must hold: every factor and the head."""
  loras = [x for x in jax.tree.leaves(params, is_leaf=lora_fn.is_lora) if lora_fn.is_lora(x)]
  head = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params["head"]))
  return sum(x.a.nbytes + x.b.nbytes for x in loras) + head


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  model = vit.vit("B/16", num_classes=101)
  base, params = adapter(model)
  modules = hf_vit.peft_modules(model)
  path = os.path.join(tempfile.mkdtemp(), "peft")
  loaded: list = []

  def run(name: str) -> None:
    if name == "export":
      lora_fn.save_peft(path, params, modules=modules, trainable=("head",), overwrite=True)
    else:
      loaded[:] = [lora_fn.load_peft(path, base, modules=modules)]
      jax.block_until_ready([x for x in jax.tree.leaves(loaded[0]) if isinstance(x, jax.Array)])

  times = interleaved(run, ["export", "import"], args.rounds)
  back = loaded[0]["layer_11"]["value"]["kernel"]
  np.testing.assert_array_equal(back.b, params["layer_11"]["value"]["kernel"].b)
  med = {n: statistics.median(t) for n, t in times.items()}
  raw = raw_bytes(params)
  file = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
  config = os.path.getsize(os.path.join(path, "adapter_config.json"))
  print("ViT-B/16, LoRA on query and value at rank 16, 101-class head trained")
  print(f"raw factor + head bytes:   {raw:,}")
  print(f"adapter_model.safetensors: {file:,}  ({file / raw:.4f} x raw, +{file - raw:,} bytes)")
  print(f"adapter_config.json:       {config:,}")
  print(f"within 1% + 16 KiB of raw: {file <= 1.01 * raw + 16 * 1024}")
  print(f"median export {med['export'] * 1e3:.1f} ms, import {med['import'] * 1e3:.1f} ms")
  total = med["export"] + med["import"]
  print(f"export + import = {total * 1e3:.1f} ms  (target < 1000 ms)")


if __name__ == "__main__":
  main()
