"""Memory of a QLoRA train step of Llama-3-8B (and 70B), from shapes alone: nothing is allocated.

The decoder is built from its published config, its parameters as ``jax.ShapeDtypeStruct``
(``jax.eval_shape``), the seven linear kernels of every layer quantised to NF4 with double
quantisation (``lorax_fn.quantize`` on abstract leaves), r=16 adapters on them, bf16 compute,
scanned and rematerialised layers, AdamW state for the adapters. The train step (forward,
backward, optimizer update, buffers donated) is AOT-compiled for one sequence of 2048 tokens
and XLA's buffer assignment (``compiled.memory_analysis()``) gives the bytes of the
parameters, the optimizer state and the temporaries. The figure is the backend's that
compiled it (the CPU's here, the chip's on a GPU/TPU machine): what one step needs at its
peak, before allocator fragmentation.

    PYTHONPATH=train python benchmarks/llm_memory.py [--model 8b|70b|both] [--seq 2048]

Targets: 8B all together <= 16 GB (a T4 / v5e-1 class chip); the QLoRA paper's anchor is 65B
in 48 GB, so the 70B figure is printed against 48 GB.
"""

from __future__ import annotations

import argparse
import time

import decoder_model as dm
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_fn as lora_fn

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = dm.LLAMA3
TARGET_GB = {"8b": 16, "70b": 48}


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_qlora(name: str, rank: int, seq: int):
  """The model and its wrapped NF4 parameters, all shapes."""
  c = dm.DecoderConfig.from_hf(
    MODELS[name], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, remat=True
  )
  model = dm.Decoder(c)
  ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  quantized = lora_fn.quantize(shapes, "nf4", targets=LINEAR, torch_order=True)
  layouts = dm.layouts(shapes)
  wrapped = jax.eval_shape(
    lambda p: lora_fn.wrap(p, rank=rank, targets=LINEAR, layouts=layouts, key=jax.random.key(1)),
    quantized,
  )
  return model, wrapped


def make_step(model, tx):
  apply = lora_fn.lora(model.apply)

  def loss_fn(trainable, frozen, batch):
    params = lora_fn.combine(trainable, frozen)
    logits = apply({"params": params}, batch["input_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (ce * batch["loss_mask"]).sum() / jnp.maximum(batch["loss_mask"].sum(), 1)

  def step(params, opt_state, batch):
    trainable, frozen = lora_fn.split(params)
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def measure(name: str, rank: int, seq: int) -> float:
  t0 = time.perf_counter()
  model, params = abstract_qlora(name, rank, seq)
  tx = lora_fn.optimizer(optax.adamw(2e-4), params)
  opt_state = jax.eval_shape(tx.init, params)
  batch = {
    "input_ids": jax.ShapeDtypeStruct((1, seq), jnp.int32),
    "targets": jax.ShapeDtypeStruct((1, seq), jnp.int32),
    "loss_mask": jax.ShapeDtypeStruct((1, seq), jnp.float32),
  }
  compiled = make_step(model, tx).lower(params, opt_state, batch).compile()
  mem = compiled.memory_analysis()
  trainable, frozen = lora_fn.split(params)
  quant = [x for x in jax.tree.leaves(frozen, is_leaf=lora_fn.is_quant) if lora_fn.is_quant(x)]
  base_q, base_rest = nbytes(quant), nbytes(frozen) - nbytes(quant)
  adapters, optim = nbytes(trainable), nbytes(opt_state)
  temp = mem.temp_size_in_bytes
  # Arguments are donated and aliased to the outputs: the peak is arguments + temporaries.
  total = mem.argument_size_in_bytes + temp + mem.output_size_in_bytes - mem.alias_size_in_bytes
  n_q = sum(int(np.prod(x.shape)) for x in quant)
  gb = lambda b: f"{b / 1e9:6.2f} GB"
  print(
    f"Llama-3-{name.upper()} QLoRA step: NF4+DQ base, r={rank} on {len(LINEAR)} kernels/layer, "
    f"seq {seq}, batch 1, bf16 compute, remat, AdamW "
    f"({jax.devices()[0].platform} backend's memory analysis; compiled in "
    f"{time.perf_counter() - t0:.0f} s)"
  )
  print(f"  {lora_fn.summary(params).splitlines()[0]}")
  print(f"  NF4 linear weights  {gb(base_q)}  ({8 * base_q / n_q:.3f} bits/param, {n_q:,} params)")
  print(f"  bf16 embeddings, head, norms {gb(base_rest)}")
  print(f"  adapters (f32)      {gb(adapters)}")
  print(f"  optimizer state     {gb(optim)}")
  print(f"  step temporaries    {gb(temp)}")
  print(f"  all together        {gb(total)}  (target <= {TARGET_GB[name]} GB)")
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("8b", "70b", "both"), default="both")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--rank", type=int, default=16)
  args = parser.parse_args()
  names = ("8b", "70b") if args.model == "both" else (args.model,)
  for name in names:
    total = measure(name, args.rank, args.seq)
    verdict = "within" if total <= TARGET_GB[name] * 1e9 else "OVER"
    print(f"  -> {total / 1e9:.2f} GB / {TARGET_GB[name]} GB: {verdict} the target")


if __name__ == "__main__":
  main()
