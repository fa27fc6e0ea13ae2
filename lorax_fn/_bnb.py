"""bitsandbytes' serialized 4-bit weights as :class:`QuantLeaf` s, bit for bit.

bitsandbytes saves a 4-bit weight (a ``Params4bit`` of a ``Linear4bit``) as the packed codes
``weight`` (two 4-bit codes a byte, in any ``quant_storage``) beside its statistics: the block
scales ``weight.absmax`` (8-bit codes with double quantisation, whose own scales are
``weight.nested_absmax``), the code tables ``weight.quant_map`` and ``weight.nested_quant_map``,
and the rest of its ``QuantState`` (shape, block size, dtype, offset) as JSON bytes in
``weight.quant_state.bitsandbytes__nf4``. :func:`from_bnb_4bit` takes them as stored, without
dequantising; the code tables must be NF4's and the 8-bit dynamic code, the ones
:class:`QuantLeaf` decodes with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate
from lorax_fn._quant_codes import DQ_BLOCK, NF4_CODE, dynamic_code
from lorax_fn._quant_leaf import QuantLeaf

_STATE = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def from_bnb_4bit(
  tensors: Mapping[str, Any],
  *,
  prefix: str = "weight",
  transposed: bool = True,
  dtype: Any = None,
) -> QuantLeaf:
  """A bitsandbytes NF4 weight, as its state dict holds it, as an ``nf4`` :class:`QuantLeaf`.

  The codes and scales are kept as stored (double-quantised scales stay 8-bit codes), so the
  leaf dequantises bit for bit as ``bitsandbytes.functional.dequantize_4bit`` does (transposed,
  with ``transposed``); its block size and double quantisation are the weight's own.

  Args:
    tensors: state-dict keys -> numpy arrays (e.g. ``{k: v.numpy() for k, v in
      layer.state_dict().items()}``); only the keys under ``prefix`` are read, so a mapping
      that reads each tensor from a checkpoint when asked holds one weight at a time.
    prefix: the key of the weight: ``"weight"`` in a layer's state dict,
      ``"model.layers.0.mlp.up_proj.weight"`` in a model's.
    transposed: give the Flax kernel ``(in, out)`` of the PyTorch ``(out, in)`` weight (the
      codes stay in PyTorch's order, :attr:`QuantLeaf.transposed`); False: the weight's shape.
    dtype: what the leaf dequantises to; None: the weight's dtype before quantisation (its
      quant state's ``dtype``).

  Returns:
    The :class:`QuantLeaf`, its arrays on the host as read (``jax.device_put`` places them).

  Raises:
    ValueError: no NF4 quant state under ``prefix``, an fp4 weight, a missing tensor (named),
      statistics that do not fit the codes, or code tables other than bitsandbytes' NF4 and
      dynamic ones.
    TypeError: ``prefix`` is no str, ``transposed`` no bool or ``dtype`` no float dtype.

  Example:
    A PyTorch ``(out, in) = (4, 64)`` weight as bitsandbytes saves it, its codes and scales made
    here by lorax_fn's bit-identical NF4 of the kernel (``torch_order=True``):

    >>> import json, numpy as np, lorax_fn as lora_fn
    >>> w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    >>> kernel = {"w": w.T}  # (in, out), as a Flax Dense holds it
    >>> q = lora_fn.quantize(kernel, "nf4", targets=("w",), double_quant=False, torch_order=True)
    >>> q = q["w"]
    >>> state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64]}
    >>> state = np.frombuffer(json.dumps(state).encode(), np.uint8)  # JSON bytes
    >>> nf4 = [-1.0, -0.6961928, -0.52507305, -0.3949175, -0.28444138, -0.18477343,
    ...        -0.091050036, 0.0, 0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983,
    ...        0.562617, 0.72295684, 1.0]  # bitsandbytes' NF4 code table
    >>> tensors = {
    ...   "weight": np.asarray(q.codes)[:, None],
    ...   "weight.absmax": np.asarray(q.absmax),
    ...   "weight.quant_map": np.array(nf4, np.float32),
    ...   "weight.quant_state.bitsandbytes__nf4": state,
    ... }
    >>> leaf = lora_fn.from_bnb_4bit(tensors)
    >>> leaf.shape, leaf.stored_shape, leaf.transposed, leaf.block_size
    ((64, 4), (4, 64), True, 64)
    >>> bool((np.asarray(leaf.dequantize()) == np.asarray(q.dequantize())).all())
    True
  """
  if not isinstance(prefix, str):
    raise TypeError(f"prefix must be a str such as 'weight'; got: {prefix!r}")
  transposed = _validate.boolean("transposed", transposed)
  dtype = _validate.float_dtype("dtype", dtype)
  state = _state(tensors, prefix)
  double_quant = "nested_blocksize" in state
  names = _PARTS if double_quant else _PARTS[:2]
  if prefix not in tensors:
    raise ValueError(f"the tensors have {prefix + _STATE + 'nf4'!r} but no {prefix!r} (the codes)")
  missing = [name for name in names if f"{prefix}.{name}" not in tensors]
  if missing:
    raise ValueError(f"the bitsandbytes weight {prefix!r} has no {prefix}.{missing[0]} tensor")
  parts = {"weight": np.asarray(tensors[prefix])}
  parts.update({name: np.asarray(tensors[f"{prefix}.{name}"]) for name in names})
  shape = tuple(int(d) for d in state["shape"])
  _check(prefix, state, parts, shape, transposed)
  return QuantLeaf(
    **_fields(parts, state, double_quant),
    kind="nf4",
    shape=(*shape[:-2], shape[-1], shape[-2]) if transposed else shape,
    dtype_name=jnp.dtype(state["dtype"] if dtype is None else dtype).name,
    block_size=int(state["blocksize"]),
    transposed=transposed,
  )


def _state(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """The weight's ``QuantState`` fields, from the JSON bytes bitsandbytes stores them as."""
  if f"{prefix}{_STATE}fp4" in tensors:
    raise ValueError(f"{prefix!r} is a bitsandbytes fp4 weight; only nf4 is supported")
  key = f"{prefix}{_STATE}nf4"
  if key not in tensors:
    raise ValueError(f"the tensors have no {key!r}: {prefix!r} is no bitsandbytes 4-bit weight")
  raw = np.ascontiguousarray(np.asarray(tensors[key])).view(np.uint8).tobytes()
  return json.loads(raw.decode())


def _check(
  prefix: str,
  state: Mapping[str, Any],
  parts: Mapping[str, np.ndarray],
  shape: tuple[int, ...],
  transposed: bool,
) -> None:
  """The statistics fit the codes, and the code tables are bitsandbytes' NF4 and dynamic."""
  if state.get("quant_type") != "nf4":
    raise ValueError(
      f"{prefix!r} has quant_type {state.get('quant_type')!r}; only nf4 is supported"
    )
  if transposed and len(shape) < 2:
    raise ValueError(f"transposed needs a weight of at least 2 axes; {prefix!r} has {shape}")
  n = math.prod(shape)
  blocks = -(-n // state["blocksize"])
  sizes = {"weight": -(-n // 2), "absmax": blocks}
  if "nested_blocksize" in state:
    if state["nested_blocksize"] != DQ_BLOCK:
      raise ValueError(f"{prefix!r} has nested_blocksize {state['nested_blocksize']}; expected 256")
    sizes["nested_absmax"] = -(-blocks // DQ_BLOCK)
  for name, size in sizes.items():
    if parts[name].size != size:
      raise ValueError(
        f"{prefix}.{name} holds {parts[name].shape} values; {size} fit the quantised shape "
        f"{shape} in blocks of {state['blocksize']}"
      )
  tables = {"quant_map": ("NF4", NF4_CODE), "nested_quant_map": ("dynamic", dynamic_code())}
  for name, (kind, table) in tables.items():
    if name not in parts:
      continue
    got = parts[name].astype(np.float32).reshape(-1)
    if got.shape != table.shape or not np.array_equal(got.view(np.uint32), table.view(np.uint32)):
      raise ValueError(
        f"{prefix}.{name} is not bitsandbytes' {kind} code table; this weight's quantisation "
        "cannot be decoded"
      )


def _fields(
  parts: Mapping[str, np.ndarray], state: Mapping[str, Any], double_quant: bool
) -> dict[str, Any]:
  """The ``QuantLeaf`` fields: codes and scales as stored, flattened."""
  codes = np.ascontiguousarray(parts["weight"]).view(np.uint8).reshape(-1)  # any storage: bytes
  if not double_quant:
    absmax = parts["absmax"].astype(np.float32).reshape(-1)
    return dict(codes=codes, absmax=absmax, absmax_codes=None, absmax_scale=None, offset=None)
  return dict(
    codes=codes,
    absmax=None,
    absmax_codes=np.ascontiguousarray(parts["absmax"]).view(np.uint8).reshape(-1),
    absmax_scale=parts["nested_absmax"].astype(np.float32).reshape(-1),
    offset=np.asarray(state["nested_offset"], np.float32),
  )
