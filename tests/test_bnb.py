"""lorax_fn.from_bnb_4bit: bitsandbytes' serialized 4-bit weights as QuantLeafs, bit for bit.

The comparisons with bitsandbytes need the interop extra (skipped without it); the round trip
of lorax_fn's own bit-identical NF4 and the error table do not.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_fn as lora_fn
from lorax_fn import _quant_codes


def _bnb():
  """``(torch, bitsandbytes)``, or the test is skipped."""
  torch = pytest.importorskip("torch", reason="interop extra not installed")
  return torch, pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")


def _quantized(torch, bnb, w, block_size, double_quant, prefix="weight"):
  """bitsandbytes' state-dict entries of ``w`` (numpy) and its own decode of them."""
  F = bnb.functional
  packed, state = F.quantize_4bit(
    w, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
  )
  tensors = {f"{prefix}.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}
  tensors[prefix] = packed.numpy()
  return tensors, F.dequantize_4bit(packed, state).float().numpy()


_decode = jax.jit(lambda q: q.dequantize())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("transposed", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_linear4bit_state_dict_decodes_bit_for_bit(double_quant, transposed, jit):
  """A Linear4bit's own state dict: blocks of 64 straddle rows of 40, the last one short."""
  torch, bnb = _bnb()
  torch.manual_seed(0)
  layer = bnb.nn.Linear4bit(
    40, 13, compress_statistics=double_quant, quant_type="nf4", compute_dtype=torch.float32
  ).to("cpu")  # quantised as it is placed
  tensors = {k: v.numpy() for k, v in layer.state_dict().items()}
  leaf = lora_fn.from_bnb_4bit(tensors, transposed=transposed)
  assert (leaf.kind, leaf.block_size, leaf.dtype) == ("nf4", 64, jnp.dtype("float32"))
  assert (leaf.shape, leaf.stored_shape) == (((40, 13) if transposed else (13, 40)), (13, 40))
  assert (leaf.absmax is None) is double_quant
  np.testing.assert_array_equal(leaf.codes, tensors["weight"].reshape(-1))  # as stored
  want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
  got = np.asarray(_decode(leaf) if jit else leaf.dequantize())
  np.testing.assert_array_equal(got, want.T if transposed else want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_block_sizes_and_bfloat16_weights(block_size, dtype):
  """2-16 blocks of 256 scales, a short last block; a bf16 weight decodes to bf16 as theirs."""
  torch, bnb = _bnb()
  w = torch.randn(61, 257, generator=torch.Generator().manual_seed(block_size))
  tensors, want = _quantized(torch, bnb, w.to(getattr(torch, dtype)), block_size, True)
  leaf = lora_fn.from_bnb_4bit(tensors)
  assert leaf.block_size == block_size and leaf.dtype == jnp.dtype(dtype)
  got = np.asarray(_decode(leaf)).astype(np.float32)
  np.testing.assert_array_equal(got, want.T)


def test_a_model_state_dict_reads_only_the_prefix():
  torch, bnb = _bnb()
  w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
  prefix = "model.layers.0.mlp.up_proj.weight"
  tensors, want = _quantized(torch, bnb, w, 64, False, prefix=prefix)
  tensors["model.norm.weight"] = np.ones(64, np.float32)
  leaf = lora_fn.from_bnb_4bit(tensors, prefix=prefix, transposed=False, dtype="bfloat16")
  assert (leaf.shape, leaf.transposed, leaf.dtype) == ((24, 64), False, jnp.dtype("bfloat16"))
  np.testing.assert_array_equal(np.asarray(leaf.dequantize(np.float32)), want)


def _serialized(double_quant, shape=(4, 64), block_size=64):
  """A weight as bitsandbytes saves it, made by lorax_fn's bit-identical NF4, and the leaf."""
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)  # (out, in)
  kw = dict(block_size=block_size, double_quant=double_quant, torch_order=True)
  q = lora_fn.quantize({"w": w.T}, "nf4", targets=("w",), **kw)["w"]
  state = {"quant_type": "nf4", "blocksize": block_size, "dtype": "float32", "shape": list(shape)}
  tensors = {
    "weight": np.asarray(q.codes)[:, None],
    "weight.quant_map": _quant_codes.NF4_CODE.copy(),
  }
  if double_quant:
    state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(q.offset))
    tensors["weight.absmax"] = np.asarray(q.absmax_codes)
    tensors["weight.nested_absmax"] = np.asarray(q.absmax_scale)
    tensors["weight.nested_quant_map"] = _quant_codes.dynamic_code()
  else:
    tensors["weight.absmax"] = np.asarray(q.absmax)
  _put_state(tensors, state)
  return tensors, q


def _put_state(tensors, state, kind="nf4"):
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  tensors[f"weight.quant_state.bitsandbytes__{kind}"] = raw


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no_dq"])
def test_round_trip_of_lorax_quantisation(double_quant):
  tensors, q = _serialized(double_quant, shape=(13, 40))
  leaf = lora_fn.from_bnb_4bit(tensors)
  assert jax.tree.structure(leaf) == jax.tree.structure(q)  # static fields included
  for got, want in zip(jax.tree.leaves(leaf), jax.tree.leaves(q), strict=True):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(_decode(leaf)), np.asarray(_decode(q)))


def _drop(key):
  return lambda t: t.pop(key)


def _state(**changes):
  def edit(t):
    state = json.loads(t.pop("weight.quant_state.bitsandbytes__nf4").tobytes())
    _put_state(t, {**state, **changes})

  return edit


def _fp4(t):
  t["weight.quant_state.bitsandbytes__fp4"] = t.pop("weight.quant_state.bitsandbytes__nf4")


ERRORS = [
  # (name, double_quant, tensors edit, options, exception, message)
  ("no state", False, None, {"prefix": "w"}, ValueError, r"no 'w.quant_state.bitsandbytes__nf4'"),
  ("fp4", False, _fp4, {}, ValueError, r"'weight' is a bitsandbytes fp4 weight; only nf4"),
  ("no codes", False, _drop("weight"), {}, ValueError, r"but no 'weight' \(the codes\)"),
  (
    "no scales",
    True,
    _drop("weight.nested_absmax"),
    {},
    ValueError,
    r"the bitsandbytes weight 'weight' has no weight.nested_absmax tensor",
  ),
  ("quant type", False, _state(quant_type="fp4"), {}, ValueError, r"has quant_type 'fp4'"),
  (
    "nested block size",
    True,
    _state(nested_blocksize=128),
    {},
    ValueError,
    r"'weight' has nested_blocksize 128; expected 256",
  ),
  (
    "scales",
    False,
    _state(blocksize=128),
    {},
    ValueError,
    r"weight.absmax holds \(4,\) values; 2 fit the quantised shape \(4, 64\) in blocks of 128",
  ),
  (
    "code table",
    False,
    lambda t: t.__setitem__("weight.quant_map", np.linspace(-1, 1, 16, dtype=np.float32)),
    {},
    ValueError,
    r"weight.quant_map is not bitsandbytes' NF4 code table",
  ),
  (
    "dynamic table",
    True,
    lambda t: t.__setitem__("weight.nested_quant_map", t["weight.nested_quant_map"][::-1].copy()),
    {},
    ValueError,
    r"weight.nested_quant_map is not bitsandbytes' dynamic code table",
  ),
  (
    "1-D",
    False,
    _state(shape=[256]),
    {},
    ValueError,
    r"transposed needs a weight of at least 2 axes; 'weight' has \(256,\)",
  ),
  ("prefix", False, None, {"prefix": 0}, TypeError, r"prefix must be a str such as 'weight'"),
  ("transposed", False, None, {"transposed": "yes"}, TypeError, r"transposed must be a bool"),
  ("dtype", False, None, {"dtype": "int8"}, TypeError, r"dtype must be a float dtype; got: 'int8'"),
]


@pytest.mark.parametrize(
  "double_quant, edit, options, exc, regex", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors(double_quant, edit, options, exc, regex):
  tensors, _ = _serialized(double_quant)
  if edit is not None:
    edit(tensors)
  with pytest.raises(exc, match=regex):
    lora_fn.from_bnb_4bit(tensors, **options)
