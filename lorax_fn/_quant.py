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

KINDS = ("nf4", "int4", "int8")

# bitsandbytes' NF4 code (index 0-15), float32.
NF4_CODE = np.array(
  [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
  ],
  np.float32,
)  # fmt: skip
INT4_CODE = (np.arange(-8, 8, dtype=np.float32) / 7.0).clip(-1, 1).astype(np.float32)
INT8_CODE = (np.arange(-128, 128, dtype=np.float32) / 127.0).clip(-1, 1).astype(np.float32)
DQ_BLOCK = 256  # block size of the second quantisation of the scales


# bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``: 7 exponent bits,
# a sign bit and a shrinking fraction), sorted, as the bits of its 256 float32 values. The
# table is the definition of the data type, like NF4's; torch's float32 ``linspace`` that
# bitsandbytes builds it with is not reproducible bit-for-bit in numpy, so it is spelled out.
_DYNAMIC_BITS = (
  "bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd "
  "bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 bf44999a bf410000 bf3d6666 bf39cccd "
  "bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd "
  "bf123334 bf0e999a bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a "
  "bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 bea2cccc be9b999a "
  "be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333 "
  "be18cccd be0a6666 bdf80000 bddb3334 bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8 "
  "bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d "
  "bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15 "
  "bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 bc1f3b64 bc160418 bc0ccccd bc039581 "
  "bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d "
  "baf1a9fc baa7ef9d ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b "
  "b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 3513a3b7 365a1a94 "
  "370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 "
  "3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 "
  "3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 "
  "3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 "
  "3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d "
  "3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7 "
  "3dc9eb85 3ddb3334 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd "
  "3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666 "
  "3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 "
  "3f03cccc 3f076666 3f0b0000 3f0e999a 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 "
  "3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333 "
  "3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333 "
  "3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000 "
)


def dynamic_code() -> np.ndarray:
  """The signed 8-bit dynamic code that double quantisation uses, sorted, float32."""
  return np.array([int(h, 16) for h in _DYNAMIC_BITS.split()], np.uint32).view(np.float32)


def _bounds(code: np.ndarray) -> np.ndarray:
  return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def _nearest(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
  """Index of the nearest code; a value exactly on a midpoint takes the lower code."""
  return np.searchsorted(_bounds(code), scaled, side="left").astype(np.uint8)


def blockwise(x: np.ndarray, block_size: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bitsandbytes' block-wise absmax quantisation of the flattened ``x``.

  Blocks are ``block_size`` consecutive elements in row-major order (straddling rows; the
  last one may be short). Full blocks are scaled by ``x * (1 / absmax)``, the short tail by
  ``x / absmax``, both clipped to [-1, 1] in float32, exactly as bitsandbytes does.

  Returns:
    ``(codes uint8 (n,), absmax float32 (blocks,))``.
  """
  flat = np.asarray(x, np.float32).reshape(-1)
  n = flat.size
  full = n - n % block_size
  blocks = flat[:full].reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1) if full else np.zeros((0,), np.float32)
  tiny = np.float32(1e-38)
  scaled = np.clip(blocks * (np.float32(1.0) / np.maximum(absmax, tiny))[:, None], -1, 1)
  scaled = scaled.reshape(-1)
  if full < n:
    am = np.abs(flat[full:]).max()
    absmax = np.concatenate([absmax, [am]]).astype(np.float32)
    scaled = np.concatenate([scaled, np.clip(flat[full:] / np.maximum(am, tiny), -1, 1)])
  return _nearest(scaled.astype(np.float32), code), absmax.astype(np.float32)


def _mean(x: np.ndarray) -> np.float32:
  """``sum / n`` in float32, like torch's ``mean``, with the sum accumulated in float64.

  bitsandbytes takes the offset from torch's float32 ``mean``, whose summation order (and
  so its last bit, in about a third of cases) depends on the CPU's vector width; a float64
  sum rounded once to float32 does not (it is the correctly rounded sum except in rare
  double-rounding ties).
  """
  total = np.float32(np.sum(x, dtype=np.float64))
  return np.float32(total / np.float32(x.size))


def pack4(codes: np.ndarray) -> np.ndarray:
  """Two 4-bit codes per byte: element 2k in the high nibble, 2k+1 in the low (zero-padded)."""
  if codes.size % 2:
    codes = np.concatenate([codes, [7 if codes.dtype == np.uint8 else 0]]).astype(np.uint8)
  return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def unpack4(packed: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`pack4`: ``n`` 4-bit codes as int32."""
  packed = packed.astype(jnp.int32)
  return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]


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
    code = jnp.asarray(_CODES[self.kind])
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
    code = jnp.asarray(_CODES[self.kind])
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


_CODES = {"nf4": NF4_CODE, "int4": INT4_CODE, "int8": INT8_CODE}


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
  code = _CODES[kind]
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
