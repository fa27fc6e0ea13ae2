"""Block-wise quantisation of frozen weights: NF4 exactly as bitsandbytes does it, int4, int8.

Quantisation runs on the host in numpy, one leaf (and one chunk of blocks) at a time, so a
model larger than device memory can be quantised leaf by leaf. Dequantisation is a lookup
table gather times the block scale, in float32, then a cast, as in bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate
from lorax_fn._quant_codes import CODES, DQ_BLOCK, KINDS, _mean, blockwise, dynamic_code, pack4
from lorax_fn._quant_leaf import QuantLeaf


def quantize_array(
  x: Any,
  kind: str,
  *,
  block_size: int = 64,
  double_quant: bool = True,
  chunk_blocks: int = 1 << 16,
  torch_order: bool = False,
) -> QuantLeaf:
  """Quantises one array on the host, ``chunk_blocks`` blocks at a time.

  With ``torch_order`` the codes encode ``x`` with its last two axes swapped, the ``(out,
  in)`` order PyTorch (and so bitsandbytes) stores an ``(in, out)`` kernel in: the codes and
  scales are bitsandbytes' of the PyTorch weight, and the leaf is ``transposed``.
  """
  host = np.asarray(jax.device_get(x))
  if torch_order and host.ndim < 2:
    raise ValueError(f"torch_order needs an array of at least 2 axes; got shape {host.shape}")
  stored = np.swapaxes(host, -1, -2) if torch_order else host
  return quantize_pieces(
    _pieces(stored, chunk_blocks * block_size),
    kind,
    shape=host.shape,
    dtype=host.dtype,
    block_size=block_size,
    double_quant=double_quant,
    transposed=torch_order,
  )


def _pieces(stored: np.ndarray, step: int) -> Iterator[np.ndarray]:
  """``stored`` flattened row-major, in pieces of about ``step`` elements, one copied at a time.

  A view with swapped axes is copied row run by row run, never whole.
  """
  if stored.ndim < 2:
    flat = stored.reshape(-1)
    for start in range(0, flat.size, step):
      yield flat[start : start + step]
    return
  rows = max(1, step // max(stored.shape[-1], 1))
  for matrix in stored.reshape(-1, *stored.shape[-2:]):
    for start in range(0, matrix.shape[0], rows):
      yield matrix[start : start + rows].reshape(-1)


def quantize_pieces(
  pieces: Iterable[Any],
  kind: str,
  *,
  shape: tuple[int, ...],
  dtype: Any,
  block_size: int = 64,
  double_quant: bool = True,
  transposed: bool = False,
) -> QuantLeaf:
  """Quantises an array given as consecutive pieces of its flattened stored (row-major) order.

  The codes equal :func:`quantize_array` of the whole array; only one piece (plus less than a
  block) is held in float at a time, so a stack of layers can be quantised as it is read.

  Args:
    pieces: arrays whose concatenated flattenings are the stored array, any sizes.
    kind: ``"nf4"``, ``"int4"`` or ``"int8"``.
    shape: the logical shape of the leaf.
    dtype: the dtype :meth:`QuantLeaf.dequantize` returns by default.
    block_size: elements per block.
    double_quant: quantise the block scales too.
    transposed: the pieces are of the array with the last two axes of ``shape`` swapped.

  Returns:
    The :class:`QuantLeaf`.

  Raises:
    ValueError: the pieces hold a different number of elements than ``shape``, an unknown
      ``kind``, a ``block_size`` that is no power of two, or ``transposed`` with fewer than 2
      axes.
    TypeError: ``double_quant`` or ``transposed`` is no bool.

  Example:
    >>> import numpy as np, lorax_fn as lora_fn
    >>> x = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    >>> rows = (x[i : i + 3] for i in range(0, 8, 3))  # as read, a few rows at a time
    >>> q = lora_fn.quantize_pieces(rows, "nf4", shape=(8, 96), dtype=np.float32)
    >>> whole = lora_fn.quantize({"x": x}, "nf4", targets=("x",))["x"]
    >>> bool((np.asarray(q.codes) == np.asarray(whole.codes)).all()), q.shape
    (True, (8, 96))
  """
  block_size, double_quant = _check_settings(kind, block_size, double_quant)
  transposed = _validate.boolean("transposed", transposed)
  if transposed and len(shape) < 2:
    raise ValueError(f"transposed needs a shape of at least 2 axes; got: {tuple(shape)}")
  code = CODES[kind]
  unit = block_size if kind == "int8" or block_size % 2 == 0 else 2 * block_size
  codes, absmax, seen = [], [], 0
  carry = np.zeros((0,), np.float32)
  for piece in pieces:
    flat = np.asarray(piece, np.float32).reshape(-1)
    seen += flat.size
    if carry.size:
      flat = np.concatenate([carry, flat])
    whole = flat.size - flat.size % unit
    carry = flat[whole:]
    if whole:
      c, a = blockwise(flat[:whole], block_size, code)
      codes.append(pack4(c) if kind != "int8" else c)
      absmax.append(a)
  if carry.size:
    c, a = blockwise(carry, block_size, code)
    codes.append(pack4(c) if kind != "int8" else c)
    absmax.append(a)
  if seen != math.prod(shape):
    n = math.prod(shape)
    raise ValueError(f"the pieces hold {seen} elements; shape {tuple(shape)} has {n}")
  scales = np.concatenate(absmax) if absmax else np.zeros((0,), np.float32)
  packed = np.concatenate(codes) if codes else np.zeros((0,), np.uint8)
  fields: dict[str, Any] = dict(
    absmax=jnp.asarray(scales), absmax_codes=None, absmax_scale=None, offset=None
  )
  if double_quant:
    offset = _mean(scales)
    qa, a2 = blockwise(scales - offset, DQ_BLOCK, dynamic_code())
    fields = dict(
      absmax=None,
      absmax_codes=jnp.asarray(qa),
      absmax_scale=jnp.asarray(a2),
      offset=jnp.asarray(offset),
    )
  return QuantLeaf(
    jnp.asarray(packed),
    **fields,
    kind=kind,
    shape=tuple(shape),
    dtype_name=str(np.dtype(dtype)),
    block_size=block_size,
    transposed=transposed,
  )


def abstract_quant(
  x: jax.ShapeDtypeStruct,
  kind: str,
  *,
  block_size: int = 64,
  double_quant: bool = True,
  torch_order: bool = False,
) -> QuantLeaf:
  """The :class:`QuantLeaf` :func:`quantize_array` would return, as shapes only.

  Its arrays are ``jax.ShapeDtypeStruct``: memory can be planned, and a step AOT-compiled,
  for a model that is never allocated.
  """
  n = math.prod(x.shape)
  blocks = -(-n // block_size)
  codes = jax.ShapeDtypeStruct((n if kind == "int8" else -(-n // 2),), np.uint8)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  if double_quant:
    fields = dict(
      absmax=None,
      absmax_codes=jax.ShapeDtypeStruct((blocks,), np.uint8),
      absmax_scale=f32(-(-blocks // DQ_BLOCK)),
      offset=f32(),
    )
  else:
    fields = dict(absmax=f32(blocks), absmax_codes=None, absmax_scale=None, offset=None)
  return QuantLeaf(
    codes,
    **fields,
    kind=kind,
    shape=tuple(x.shape),
    dtype_name=str(np.dtype(x.dtype)),
    block_size=block_size,
    transposed=torch_order,
  )


def _check_settings(kind: Any, block_size: Any, double_quant: Any) -> tuple[int, bool]:
  """``(block_size, double_quant)`` checked; a ValueError/TypeError naming the bad one."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got: {kind!r}")
  block_size = _validate.positive_int("block_size (a power of two)", block_size)
  if block_size & (block_size - 1):
    raise ValueError(f"block_size must be a positive power of two; got: {block_size!r}")
  return block_size, _validate.boolean("double_quant", double_quant)


def is_quant(x: object) -> bool:
  """True for a :class:`QuantLeaf`."""
  return isinstance(x, QuantLeaf)


def quantize(
  params: Any,
  kind: str,
  *,
  targets: Any,
  block_size: int = 64,
  double_quant: bool = True,
  torch_order: bool = False,
) -> Any:
  """Replaces the targeted frozen kernels by :class:`QuantLeaf` nodes (QLoRA's base).

  ``"nf4"`` is bitsandbytes' NF4 bit-for-bit (code table, row-major blocks that straddle
  rows with a short tail, float32 absmax, ties to the lower code, element 2k in the high
  nibble); with ``double_quant`` the block scales are quantised again with the 8-bit dynamic
  code in blocks of 256, 4.127 bits per parameter at block size 64. ``"int4"`` is symmetric
  per-block (codes -8..7 over 7) and ``"int8"`` per-block absmax (-128..127 over 127), for
  comparison. Compose with :func:`lorax_fn.wrap` for QLoRA. Quantisation runs on the host,
  leaf by leaf and chunk by chunk.

  Args:
    params: a pytree of arrays (it may already hold LoRA leaves over plain bases). Targeted
      ``jax.ShapeDtypeStruct`` leaves give leaves of shapes only (nothing is computed), to
      plan memory or AOT-compile a step for a model that is never allocated.
    kind: ``"nf4"``, ``"int4"`` or ``"int8"``.
    targets: as for :func:`lorax_fn.wrap`.
    block_size: elements per block; a positive power of two.
    double_quant: quantise the block scales too (bitsandbytes' ``compress_statistics``).
    torch_order: quantise each kernel with its last two axes swapped, in the ``(out, in)``
      order PyTorch stores a linear weight in, so the codes and scales are bitsandbytes' of
      the PyTorch weight (its blocks straddle rows of ``out``). The leaves are ``transposed``;
      they keep the kernel's shape and dequantise to it.

  Returns:
    A new pytree with :class:`QuantLeaf` nodes at the targets.

  Raises:
    ValueError: for an unknown kind, a bad block size, targets that match nothing or a leaf
      that is already quantised.
    TypeError: if a targeted leaf is not a float array.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    >>> q = lora_fn.quantize(p, "nf4", targets=("dense",))
    >>> q["dense"]["kernel"].codes.shape, q["dense"]["kernel"].dequantize().shape
    ((1024,), (64, 32))
    >>> t = lora_fn.quantize(p, "nf4", targets=("dense",), torch_order=True)["dense"]["kernel"]
    >>> t.shape, t.stored_shape, t.transposed
    ((64, 32), (32, 64), True)
  """
  from lorax_fn import _paths
  from lorax_fn._leaves import is_lora

  block_size, double_quant = _check_settings(kind, block_size, double_quant)
  torch_order = _validate.boolean("torch_order", torch_order)
  is_node = lambda x: is_lora(x) or is_quant(x)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  paths = [_paths.path_str(p) for p, _ in flat]
  hits = _paths.select(targets, paths, [x for _, x in flat])
  out = [x for _, x in flat]
  for i in hits:
    path, leaf = paths[i], out[i]
    base = leaf.w if is_lora(leaf) else leaf
    if is_quant(base):
      raise ValueError(f"the leaf at {path!r} is already quantised ({base.kind}).")
    if not jnp.issubdtype(getattr(base, "dtype", np.dtype(object)), jnp.floating):
      raise TypeError(
        f"the targeted leaf at {path!r} must be a float array; got: "
        f"{getattr(base, 'dtype', type(base).__name__)}"
      )
    if np.ndim(base) < 2:
      raise ValueError(
        f"the targeted leaf at {path!r} must have at least 2 axes (a kernel); got shape "
        f"{np.shape(base)}"
      )
    settings = dict(block_size=block_size, double_quant=double_quant, torch_order=torch_order)
    if isinstance(base, jax.ShapeDtypeStruct):
      q = abstract_quant(base, kind, **settings)
    else:
      q = quantize_array(base, kind, **settings)
    out[i] = dataclasses.replace(leaf, w=q) if is_lora(leaf) else q
  return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_tree(params: Any) -> Any:
  """Every :class:`QuantLeaf` replaced by its dequantised array (original dtype)."""
  return jax.tree.map(lambda x: x.dequantize() if is_quant(x) else x, params, is_leaf=is_quant)
