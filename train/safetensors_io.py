"""safetensors files, tensor by tensor: headers, byte ranges, bfloat16, writing; checkpoint shards.

A small reader and writer of the documented format (an 8-byte header length, a JSON header of
dtypes, shapes and byte offsets, then the raw little-endian data): ``safetensors``' numpy
backend cannot return bfloat16, and reading byte ranges keeps one tensor in memory at a time.
A transformers checkpoint holds one ``model.safetensors`` or shards named by
``model.safetensors.index.json`` (:func:`weight_files`, :func:`read_index`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class Tensor(NamedTuple):
  """Where one tensor of a safetensors file lies (read by :func:`read_tensor`)."""

  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # byte offset in the file
  nbytes: int


def read_header(file: str) -> dict[str, Tensor]:
  """The tensors of one safetensors file, from its header alone (no data is read).

  Raises:
    ValueError: a file that is not safetensors, an unknown dtype or inconsistent offsets.
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
      raise ValueError(f"{file!r} is not a safetensors file (header length {n})")
    header = json.loads(f.read(n))
  tensors = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"tensor {key!r} in {file!r} has dtype {info['dtype']}, which is not read")
    dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise ValueError(f"tensor {key!r} in {file!r} has offsets that do not fit its shape")
    tensors[key] = Tensor(file, dtype, shape, 8 + n + begin, end - begin)
  return tensors


def read_tensor(tensor: Tensor, dtype: Any = None) -> np.ndarray:
  """The tensor's data: its bytes read straight into a new array (viewed as ``dtype``)."""
  out = np.empty(tensor.shape, tensor.dtype)
  with open(tensor.file, "rb") as f:
    f.seek(tensor.start)
    if f.readinto(out.reshape(-1).view(np.uint8)) != tensor.nbytes:
      raise ValueError(f"{tensor.file!r} ends inside a tensor")
  return out if dtype is None else out.view(dtype)


def write_safetensors(file: str, tensors: Sequence[tuple[str, Any]], fetch: Callable) -> None:
  """Writes ``(key, abstract)`` tensors in order, ``fetch(key)`` giving each one's data then."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks "pt"
  offset = 0
  for key, aval in tensors:
    dtype = np.dtype(aval.dtype)
    end = offset + math.prod(aval.shape) * dtype.itemsize
    header[key] = {"dtype": _NAMES[dtype], "shape": list(aval.shape), "data_offsets": [offset, end]}
    offset = end
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for key, aval in tensors:
      data = np.ascontiguousarray(fetch(key), np.dtype(aval.dtype))
      assert data.shape == tuple(aval.shape), (key, data.shape, aval.shape)
      f.write(data.reshape(-1).view(np.uint8).data)


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint directory: one file, or the shards of the index."""
  single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, SHARD_INDEX)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
      raise FileNotFoundError(f"{SHARD_INDEX} in {directory!r} names missing shards {missing}")
    return [os.path.join(directory, s) for s in shards]
  raise FileNotFoundError(f"{directory!r} has neither {WEIGHTS} nor {SHARD_INDEX}")


def read_index(files: Sequence[str]) -> dict[str, Tensor]:
  """Every tensor of ``files`` by key, from their headers alone.

  Raises:
    ValueError: a key in two files, or a file :func:`read_header` rejects.
  """
  tensors: dict[str, Tensor] = {}
  for file in files:
    for key, t in read_header(file).items():
      if key in tensors:
        raise ValueError(f"tensor {key!r} is in both {tensors[key].file!r} and {file!r}")
      tensors[key] = t
  return tensors
