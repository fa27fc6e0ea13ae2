"""Published figures the LLM path must reproduce, from shapes alone (nothing is allocated)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import decoder_model as dm
import jax
import jax.numpy as jnp

import lorax_fn as lora_fn

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B = dm.LLAMA3["8b"]


def _abstract(config, **options):
  model = dm.Decoder(dm.DecoderConfig.from_hf(config, **options))
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids)["params"]


def test_llama3_8b_r16_on_every_linear_kernel_prints_peft_s_line():
  shapes = _abstract(LLAMA3_8B)
  wrapped = jax.eval_shape(
    lambda p: lora_fn.wrap(p, rank=16, targets=LINEAR, key=jax.random.key(0)), shapes
  )
  line = lora_fn.summary(wrapped).splitlines()[0]
  assert line == ("trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196")


def test_the_line_is_the_same_for_scanned_layers_over_an_nf4_base():
  shapes = _abstract(LLAMA3_8B, scan_layers=True, param_dtype=jnp.bfloat16)
  quantized = lora_fn.quantize(shapes, "nf4", targets=LINEAR, torch_order=True)
  layouts = dm.layouts(shapes)
  wrapped = jax.eval_shape(
    lambda p: lora_fn.wrap(p, rank=16, targets=LINEAR, layouts=layouts, key=jax.random.key(0)),
    quantized,
  )
  assert (
    lora_fn.summary(wrapped)
    .splitlines()[0]
    .startswith("trainable params: 41,943,040 || all params: 8,072,204,288 ||")
  )
  codes = sum(
    x.codes.shape[0]
    for x in jax.tree.leaves(quantized, is_leaf=lora_fn.is_quant)
    if lora_fn.is_quant(x)
  )
  assert codes * 2 == 6_979_321_856  # the seven kernels of 32 layers, two codes a byte
