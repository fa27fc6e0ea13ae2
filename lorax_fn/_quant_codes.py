"""The code tables and host-side block encoding of quantised bases, as bitsandbytes has them.

NF4's 16 values, the symmetric int4 / int8 grids, and the signed 8-bit dynamic code that
double quantisation uses; :func:`blockwise` is bitsandbytes' block-wise absmax quantisation
in numpy, and :func:`pack4` / :func:`unpack4` its two-codes-a-byte packing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


CODES = {"nf4": NF4_CODE, "int4": INT4_CODE, "int8": INT8_CODE}
"""The code table of each kind."""
