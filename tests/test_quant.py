"""Block-wise quantisation against bitsandbytes (interop; skipped without it)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lora_fn
from lorax_fn import _quant, _quant_codes, _quant_leaf

torch = pytest.importorskip(
  "torch", reason="interop extra not installed: pip install -e '.[interop]'"
)
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")


def _input(dtype, block_size, shape=(13, 37)):
  gen = torch.Generator().manual_seed(block_size)
  x = torch.randn(*shape, generator=gen).mul(3).to(dtype)
  x.view(-1)[:block_size] = 0  # an all-zero block: code 7 (0.0), absmax 0
  # A block whose values sit exactly on the midpoints between codes: ties take the lower code.
  bounds = torch.from_numpy(_quant_codes._bounds(_quant_codes.NF4_CODE))
  x.view(-1)[block_size : block_size + 15] = bounds.to(dtype)
  x.view(-1)[block_size + 15] = 1.0
  return x


def test_dynamic_code_is_bitsandbytes():
  np.testing.assert_array_equal(
    _quant_codes.dynamic_code(), F.create_dynamic_map(signed=True).numpy()
  )


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
  code = _quant_codes.dynamic_code()
  _, absmax = _quant_codes.blockwise(x.numpy(), block_size, _quant_codes.NF4_CODE)
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


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "dq"])
def test_transposed_leaf_decodes_bitsandbytes_torch_weight_bit_for_bit(double_quant, jit):
  """A PyTorch (out, in) weight quantised by bitsandbytes is our (in, out) kernel, transposed."""
  w = _input(torch.float32, 64, shape=(13, 40))  # (out, in): blocks of 64 straddle rows of 40
  packed, state = F.quantize_4bit(
    w, blocksize=64, quant_type="nf4", compress_statistics=double_quant
  )
  ours = _quant.quantize_array(w.numpy().T, "nf4", double_quant=double_quant, torch_order=True)
  assert (ours.shape, ours.stored_shape, ours.transposed) == ((40, 13), (13, 40), True)
  np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
  if double_quant:  # bitsandbytes' own statistics (its CPU rounding of the scales differs)
    ours = dataclasses.replace(
      ours,
      absmax_codes=jnp.asarray(state.absmax.numpy()),
      absmax_scale=jnp.asarray(state.state2.absmax.numpy()),
      offset=jnp.asarray(state.offset.numpy()),
    )
  else:
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
  decode = jax.jit(lambda q: q.dequantize()) if jit else (lambda q: q.dequantize())
  want = F.dequantize_4bit(packed, state).numpy()
  np.testing.assert_array_equal(np.asarray(decode(ours)), want.T)


@pytest.mark.parametrize("torch_order", [False, True])
def test_decode_rows_slices_the_stored_rows(torch_order):
  x = np.random.default_rng(0).standard_normal((3, 16, 8)).astype(np.float32)
  stack = _quant.quantize_array(x, "nf4", block_size=32, torch_order=torch_order)
  full = np.asarray(stack.dequantize())
  assert stack.row_axis == 0 and stack.sliceable()
  np.testing.assert_array_equal(np.asarray(stack.decode_rows(1, 2)), full[1:3])
  layer = _quant_leaf.QuantSlice(stack, jnp.asarray(2))
  np.testing.assert_array_equal(np.asarray(layer.dequantize()), full[2])
  axis = 1 if torch_order else 0  # a transposed kernel's stored rows are its columns
  assert layer.row_axis == axis
  want = full[2][:, 4:8] if torch_order else full[2][4:8]
  np.testing.assert_array_equal(np.asarray(layer.decode_rows(4, 4)), want)
  matrix = _quant.quantize_array(x[0], "nf4", block_size=8, torch_order=torch_order)
  assert matrix.row_axis == axis and matrix.sliceable() is not torch_order


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("sizes", [(1000,), (7, 300, 1, 692), (64, 64, 872)])
def test_quantize_pieces_equals_quantize_array(kind, sizes):
  """Pieces of any sizes (not whole blocks) give the codes of the whole array."""
  x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
  want = _quant.quantize_array(x.reshape(10, 100), kind, block_size=64)
  pieces = np.split(x, np.cumsum(sizes)[:-1])
  got = _quant.quantize_pieces(pieces, kind, shape=(10, 100), dtype=np.float32, block_size=64)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"the pieces hold 999 elements; shape \(10, 100\) has 1000"):
    _quant.quantize_pieces([x[:999]], kind, shape=(10, 100), dtype=np.float32)


def test_per_layer_offsets_decode_each_layer_as_its_own_leaf():
  """A stack of separately double-quantised layers keeps one offset per layer."""
  rng = np.random.default_rng(2)
  layers = [rng.standard_normal((128, 128)).astype(np.float32) * (i + 1) for i in range(3)]
  alone = [_quant.quantize_array(w, "nf4", torch_order=True) for w in layers]
  assert alone[0].absmax_codes.size % 256 == 0  # whole blocks of 256 scales per layer
  cat = lambda f: jnp.concatenate([getattr(q, f).reshape(-1) for q in alone])
  stack = dataclasses.replace(
    alone[0],
    codes=cat("codes"),
    absmax_codes=cat("absmax_codes"),
    absmax_scale=cat("absmax_scale"),
    offset=cat("offset"),
    shape=(3, 128, 128),
  )
  for i, q in enumerate(alone):
    np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda s: s.dequantize())(stack))[i], np.asarray(q.dequantize())
    )


@pytest.mark.parametrize(
  "shape, kind, block_size, double_quant, torch_order",
  [
    ((7, 11), "nf4", 64, True, False),
    ((13, 5), "nf4", 16, False, True),
    ((3, 7, 9), "int4", 32, True, False),
    ((11, 600), "int8", 64, True, True),
  ],
)
def test_abstract_leaves_have_the_shapes_of_real_ones(
  shape, kind, block_size, double_quant, torch_order
):
  x = jax.random.normal(jax.random.key(0), shape)
  kw = dict(targets=("w",), block_size=block_size, double_quant=double_quant)
  real = lora_fn.quantize({"w": x}, kind, torch_order=torch_order, **kw)["w"]
  struct = jax.ShapeDtypeStruct(shape, jnp.float32)
  abstract = lora_fn.quantize({"w": struct}, kind, torch_order=torch_order, **kw)["w"]
  spec = lambda leaf: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), leaf)
  assert spec(abstract) == spec(real)  # static fields too: the tree structures compare them
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
