"""``QuantLeaf``: a frozen weight as block-wise codes and scales, decoded on device.

:class:`QuantSlice` is one layer of a stacked ``QuantLeaf``, decoded lazily inside ``scan``
bodies. Decoding is a lookup table gather times the block scale, in float32, then a cast,
as in bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn._quant_codes import CODES, DQ_BLOCK, dynamic_code, unpack4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantLeaf:
  """A frozen weight stored as block-wise codes and scales; see :func:`lorax_fn.quantize`.

  Attributes:
    codes: uint8; two 4-bit codes per byte for ``nf4``/``int4``, one per byte for ``int8``.
    absmax: float32 block scales, or ``None`` with double quantisation.
    absmax_codes: uint8 8-bit dynamic codes of ``absmax - offset`` (double quantisation).
    absmax_scale: float32 scales of those codes, one per 256 blocks.
    offset: float32 mean of the block scales that double quantisation subtracts: a scalar,
      or one per layer for a stack of separately quantised layers (a bitsandbytes checkpoint
      loaded with scanned layers: each layer's scales are whole blocks of 256).
    kind, shape, dtype, block_size: static. ``shape`` is the logical shape the model sees.
    transposed: static; the codes encode the array with its last two axes swapped (PyTorch's
      ``(out, in)`` order of a Flax ``(in, out)`` kernel), as bitsandbytes checkpoints store
      them: blocks run along ``in`` and straddle the rows of ``out``.
  """

  codes: jax.Array
  absmax: jax.Array | None
  absmax_codes: jax.Array | None
  absmax_scale: jax.Array | None
  offset: jax.Array | None
  kind: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype_name: str = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def dtype(self) -> np.dtype:
    return jnp.dtype(self.dtype_name)

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The shape of the array the codes encode, row-major."""
    return _stored(self.shape, self.transposed)

  @property
  def row_axis(self) -> int:
    """The logical axis whose index is the stored axis 0 (what :meth:`decode_rows` slices)."""
    return _row_axis(self.shape, self.transposed)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def scales(self) -> jax.Array:
    """The float32 block scales (decoding the double quantisation if there is one)."""
    if self.absmax is not None:
      return self.absmax
    dyn = jnp.asarray(dynamic_code())[self.absmax_codes.astype(jnp.int32)]
    per = jnp.repeat(self.absmax_scale, DQ_BLOCK)[: dyn.shape[0]]
    # bitsandbytes rounds ``dyn * per`` to float32 and then adds the offset. XLA's CPU
    # backend (measured; GPU backends may too) contracts a multiply feeding an add into one
    # fused multiply-add, which rounds once and moves the last bit of about 1 scale in 20.
    # Multiplying the rounded product by a 1 the compiler cannot prove is 1 leaves it nothing
    # to contract but ``fma(p, 1, offset)``, which is exactly ``round(p + offset)``.
    offset = self.offset
    if jnp.ndim(offset):  # one offset per stacked layer, each layer the same number of blocks
      offset = jnp.repeat(offset, dyn.shape[0] // offset.shape[0])
    one = 1.0 + 0.0 * offset
    return (dyn * per) * one + offset

  def decode_flat(self, first: Any, n: int) -> jax.Array:
    """Elements ``first .. first + n`` of the flattened array, decoded in float32.

    ``first`` (which may be traced) and ``n`` must be multiples of the block size, and even
    for 4-bit codes.
    """
    code = jnp.asarray(CODES[self.kind])
    if self.kind == "int8":
      q = jax.lax.dynamic_slice_in_dim(self.codes, first, n).astype(jnp.int32)
    else:
      q = unpack4(jax.lax.dynamic_slice_in_dim(self.codes, first // 2, n // 2), n)
    scales = jax.lax.dynamic_slice_in_dim(
      self.scales(), first // self.block_size, n // self.block_size
    )
    return (code[q].reshape(-1, self.block_size) * scales[:, None]).reshape(-1)

  def decode_rows(self, start: Any, rows: int) -> jax.Array:
    """Indices ``start .. start + rows`` of :attr:`row_axis` (stored rows), in float32.

    That is axis 0, except for a transposed 2-D kernel, whose stored rows are its columns.
    ``rows`` times the row size must be a multiple of the block size (and even for 4-bit
    codes); ``start`` may be traced.
    """
    return _decode_rows(self, 0, self.stored_shape, self.transposed, start, rows)

  def sliceable(self) -> bool:
    """Whether each index of axis 0 starts on a block (and byte) boundary."""
    row = math.prod(self.shape[1:])
    aligned = row % self.block_size == 0 and (self.kind == "int8" or row % 2 == 0)
    return aligned and self.row_axis == 0

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """``code[q] * absmax`` in float32, cast to ``dtype`` (default: the original dtype)."""
    n = self.size
    code = jnp.asarray(CODES[self.kind])
    q = unpack4(self.codes, n) if self.kind != "int8" else self.codes.astype(jnp.int32)
    values = code[q]
    scales = self.scales()
    pad = (-n) % self.block_size
    values = jnp.pad(values, (0, pad)).reshape(-1, self.block_size) * scales[:, None]
    out = _logical(values.reshape(-1)[:n].reshape(self.stored_shape), self.transposed)
    return out.astype(self.dtype if dtype is None else dtype)


def _stored(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
  return (*shape[:-2], shape[-1], shape[-2]) if transposed else tuple(shape)


def _row_axis(shape: tuple[int, ...], transposed: bool) -> int:
  return len(shape) - 1 if transposed and len(shape) == 2 else 0


def _logical(x: jax.Array, transposed: bool) -> jax.Array:
  """A decoded stored array (or run of stored rows) in the logical axis order."""
  return jnp.swapaxes(x, -1, -2) if transposed else x


def _decode_rows(
  stack: QuantLeaf, first: Any, stored: tuple[int, ...], transposed: bool, start: Any, rows: int
) -> jax.Array:
  """Stored rows ``start ..`` of the array whose flat codes begin at ``first`` in ``stack``."""
  row = math.prod(stored[1:])
  flat = stack.decode_flat(first + start * row, rows * row)
  return _logical(flat.reshape(rows, *stored[1:]), transposed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantSlice:
  """``stack[index]`` of a stacked :class:`QuantLeaf`, decoded lazily (for ``scan`` bodies).

  Only that layer's codes are decoded, so a scanned QLoRA model never holds a float copy of
  the whole stack. Requires ``stack.sliceable()``.
  """

  stack: QuantLeaf
  index: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack.shape[1:]

  @property
  def dtype(self) -> np.dtype:
    return self.stack.dtype

  @property
  def kind(self) -> str:
    return self.stack.kind

  @property
  def block_size(self) -> int:
    return self.stack.block_size

  @property
  def transposed(self) -> bool:
    return self.stack.transposed

  @property
  def row_axis(self) -> int:
    return _row_axis(self.shape, self.transposed)

  def decode_rows(self, start: Any, rows: int) -> jax.Array:
    first, stored = self.index * math.prod(self.shape), self.stack.stored_shape[1:]
    return _decode_rows(self.stack, first, stored, self.transposed, start, rows)

  def sliceable(self) -> bool:
    return False  # a scan over a slice of a stack decodes the slice whole

  def dequantize(self, dtype: Any = None) -> jax.Array:
    n = math.prod(self.shape)
    flat = self.stack.decode_flat(self.index * n, n)
    out = _logical(flat.reshape(self.stack.stored_shape[1:]), self.transposed)
    return out.astype(self.dtype if dtype is None else dtype)
