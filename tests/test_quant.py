"""Block-wise quantisation against bitsandbytes (interop; skipped without it)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_fn import _quant

torch = pytest.importorskip(
  "torch", reason="interop extra not installed: pip install -e '.[interop]'"
)
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")


def _input(dtype, block_size, shape=(13, 37)):
  gen = torch.Generator().manual_seed(block_size)
  x = torch.randn(*shape, generator=gen).mul(3).to(dtype)
  x.view(-1)[:block_size] = 0  # an all-zero block: code 7 (0.0), absmax 0
  # A block whose values sit exactly on the midpoints between codes: ties take the lower code.
  bounds = torch.from_numpy(_quant._bounds(_quant.NF4_CODE))
  x.view(-1)[block_size : block_size + 15] = bounds.to(dtype)
  x.view(-1)[block_size + 15] = 1.0
  return x


def test_dynamic_code_is_bitsandbytes():
  np.testing.assert_array_equal(_quant.dynamic_code(), F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_nf4_is_bit_identical_to_bitsandbytes(block_size, dtype):
  x = _input(getattr(torch, dtype), block_size)
  packed, state = F.quantize_4bit(
    x, blocksize=block_size, quant_type="nf4", compress_statistics=False
  )
  ours = _quant.quantize_array(x.float().numpy(), "nf4", block_size=block_size, double_quant=False)
  np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
  want = F.dequantize_4bit(packed, state).float().numpy()
  got = np.asarray(ours.dequantize(np.float32))
  if dtype == "bfloat16":  # bitsandbytes decodes in float32, then casts
    got = np.asarray(ours.dequantize(np.float32).astype("bfloat16")).astype(np.float32)
  np.testing.assert_array_equal(got, want)
  assert np.asarray(ours.codes)[0] == 0x77  # the zero block


@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_double_quant_within_one_code_step_of_the_cpu_reference(block_size):
  x = _input(torch.float32, block_size)
  packed, state = F.quantize_4bit(
    x, blocksize=block_size, quant_type="nf4", compress_statistics=True
  )
  ours = _quant.quantize_array(x.numpy(), "nf4", block_size=block_size, double_quant=True)
  np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
  # The offset is torch's float32 mean there, whose summation order depends on the CPU; ours
  # sums exactly. At most one ulp apart.
  ulps = np.asarray(ours.offset).view(np.int32) - state.offset.numpy().view(np.int32)
  assert abs(int(ulps)) <= 1
  np.testing.assert_allclose(
    np.asarray(ours.absmax_scale), state.state2.absmax.numpy(), rtol=1e-6, atol=0
  )
  # bitsandbytes' CPU kernel rounds through a 65,536-bin table; we round to the exact nearest
  # code, as its CUDA kernel does: at most one step apart, and ours is never farther.
  mine, ref = np.asarray(ours.absmax_codes).astype(int), state.absmax.numpy().astype(int)
  assert np.abs(mine - ref).max() <= 1
  code = _quant.dynamic_code()
  _, absmax = _quant.blockwise(x.numpy(), block_size, _quant.NF4_CODE)
  scaled = (absmax - np.float32(ours.offset)) / np.repeat(np.asarray(ours.absmax_scale), 256)[
    : len(absmax)
  ]
  assert np.all(np.abs(scaled - code[mine]) <= np.abs(scaled - code[ref]) + 1e-7)
  want = F.dequantize_4bit(packed, state).numpy()
  step = np.max(np.diff(code)) * np.asarray(ours.absmax_scale).max()  # one 8-bit code step
  np.testing.assert_allclose(np.asarray(ours.dequantize()), want, rtol=0, atol=step)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_decoding_bitsandbytes_double_quant_statistics_is_bit_identical(block_size, dtype, jit):
  """With bitsandbytes' own statistics our decode (eager and compiled) is its decode."""
  x = _input(getattr(torch, dtype), block_size, shape=(61, 257))  # 2-16 blocks of 256 scales
  packed, state = F.quantize_4bit(
    x, blocksize=block_size, quant_type="nf4", compress_statistics=True
  )
  ours = _quant.quantize_array(x.float().numpy(), "nf4", block_size=block_size)
  theirs = dataclasses.replace(
    ours,
    absmax_codes=jnp.asarray(state.absmax.numpy()),
    absmax_scale=jnp.asarray(state.state2.absmax.numpy()),
    offset=jnp.asarray(state.offset.numpy()),
  )
  decode = (
    jax.jit(lambda q: q.dequantize(np.float32)) if jit else (lambda q: q.dequantize(np.float32))
  )
  got = np.asarray(decode(theirs))
  if dtype == "bfloat16":  # bitsandbytes decodes in float32, then casts
    got = got.astype(jnp.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got, F.dequantize_4bit(packed, state).float().numpy())


def test_memory_nf4_with_double_quant():
  x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
  q = _quant.quantize_array(x, "nf4", block_size=64, double_quant=True)
  stored = sum(np.asarray(a).nbytes for a in (q.codes, q.absmax_codes, q.absmax_scale, q.offset))
  assert stored * 8 / x.size <= 4.13  # bits per parameter
  assert stored <= 0.26 * x.size * 2  # vs the same weights in bf16
