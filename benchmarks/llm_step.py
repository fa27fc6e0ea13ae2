"""Decoder train-step time: full fine-tune vs LoRA vs QLoRA (NF4 + double quantisation).

A Llama-style decoder (d=512, 4 layers, 8 heads, 4 KV heads, MLP 1408, vocab 8000, seq 256,
batch 4 by default) trained with Adam: every parameter (full), r=16 adapters on all seven
linear kernels of every layer (LoRA), and the same adapters over an NF4 base (QLoRA). The
steps run interleaved; the script prints median step times, tokens/s and the ratios.

    PYTHONPATH=train python benchmarks/llm_step.py [--dim 512] [--layers 4] [--seq 256]

On an accelerator it also prints model FLOPs utilisation when ``--peak-tflops`` is given
(the chip's dense bf16 peak), and the device's measured peak memory when it reports one.
"""

from __future__ import annotations

import argparse
import statistics

import decoder_model as dm
import jax
import jax.numpy as jnp
import optax
from _timing import interleaved

import lorax_fn as lora_fn

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config(args: argparse.Namespace) -> dm.DecoderConfig:
  heads = args.dim // 64
  return dm.DecoderConfig(
    vocab_size=args.vocab,
    hidden_size=args.dim,
    intermediate_size=args.mlp,
    num_hidden_layers=args.layers,
    num_attention_heads=heads,
    num_key_value_heads=max(1, heads // 2),
    head_dim=64,
    rope_theta=500000.0,
    dtype=jnp.dtype(args.dtype),
  )


def loss_fn(apply, params, batch):
  logits = apply({"params": params}, batch[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
  return ce.mean()


def make_step(model, params, *, lora: bool):
  tx = lora_fn.optimizer(optax.adam(1e-4), params) if lora else optax.adam(1e-4)
  apply = lora_fn.lora(model.apply) if lora else model.apply

  def step(params, opt_state, batch):
    if lora:
      trainable, frozen = lora_fn.split(params)
      loss, grads = jax.value_and_grad(lambda t: loss_fn(apply, lora_fn.combine(t, frozen), batch))(
        trainable
      )
      updates, opt_state = tx.update(grads, opt_state, trainable)
      params = lora_fn.combine(optax.apply_updates(trainable, updates), frozen)
    else:
      loss, grads = jax.value_and_grad(lambda p: loss_fn(apply, p, batch))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), tx.init(params)


def train_flops(c: dm.DecoderConfig, tokens: int, *, lora: bool) -> float:
  """Model FLOPs of one step: 6·N·tokens for full (2 forward, 4 backward), 4·N·tokens for LoRA.

  LoRA skips the weight gradients (a third of the matmul work); attention scores are added
  as 12·L·seq·d per token (PaLM's appendix B). Adapters add under 2% and are left out.
  """
  hd = c.head_dim
  per_layer = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
  per_layer += 3 * c.hidden_size * c.intermediate_size
  n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
  return (4 if lora else 6) * n * tokens


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--mlp", type=int, default=1408)
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
  parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on a chip")
  args = parser.parse_args()
  c = config(args)
  model = dm.Decoder(c)
  batch = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, c.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), batch[:, :-1])["params"]
  quantized = lora_fn.quantize(params, "nf4", targets=LINEAR)
  variants = {
    "full": (params, False),
    "LoRA": (lora_fn.wrap(params, rank=args.rank, targets=LINEAR, key=jax.random.key(2)), True),
    "QLoRA": (
      lora_fn.wrap(quantized, rank=args.rank, targets=LINEAR, key=jax.random.key(2)),
      True,
    ),
  }
  steps, state = {}, {}
  for name, (p, lora) in variants.items():
    p = jax.tree.map(jnp.copy, p)  # each variant owns its buffers (the step donates them)
    steps[name], opt_state = make_step(model, p, lora=lora)
    state[name] = (p, opt_state)

  def run(name: str) -> None:
    p, opt_state, loss = steps[name](*state[name], batch)
    jax.block_until_ready(loss)
    state[name] = (p, opt_state)

  times = interleaved(run, list(variants), args.rounds)
  med = {n: statistics.median(t) for n, t in times.items()}
  tokens = args.batch * args.seq
  print(
    f"decoder d={args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
    f"rank {args.rank} on {len(LINEAR)} kernels/layer, {args.dtype} compute, "
    f"{jax.devices()[0].platform} ({jax.device_count()} device(s)), {args.rounds} rounds"
  )
  for name in variants:
    line = f"{name:>6}: median step {med[name] * 1e3:8.1f} ms  {tokens / med[name]:9.0f} tokens/s"
    if args.peak_tflops:
      flops = train_flops(c, tokens, lora=name != "full")
      line += f"  MFU {flops / med[name] / (args.peak_tflops * 1e12):.1%}"
    print(line)
  print(f"LoRA/full   step time = {med['LoRA'] / med['full']:.2f}  (target <= 0.8)")
  print(f"QLoRA/LoRA  step time = {med['QLoRA'] / med['LoRA']:.2f}  (target <= 1.5)")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"device peak memory in use: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


if __name__ == "__main__":
  main()
