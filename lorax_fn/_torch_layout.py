"""Flax kernels and LoRA factors in PyTorch's layouts, derived from each kernel's axis roles.

A Flax kernel's ``in`` axes, flattened in kernel order, are a PyTorch ``Linear``'s
``in_features`` and its ``out`` axes its ``out_features`` (how ``W.T.reshape(...)`` ports a
``Linear`` to a ``Dense`` / ``DenseGeneral``). A 4-D kernel laid out ``(in, in, in, out)`` is a
``Conv2d`` (Flax ``(kh, kw, in, out)``, PyTorch ``(out, in, kh, kw)``), and an ``embedding``
an ``Embedding`` (``(num, dim)`` in both). PEFT's factors follow: ``lora_A`` ``(r, in)`` and
``lora_B`` ``(out, r)``; for a ``Conv2d`` ``(r, in, kh, kw)`` and ``(out, r, 1, 1)``; for an
``Embedding`` ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B`` ``(dim, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LINEAR, CONV2D, EMBEDDING = "Linear", "Conv2d", "Embedding"


def kind(name: str, roles: Sequence[str]) -> str:
  """The PyTorch module a kernel stands for, from its leaf name and axis roles (no stack)."""
  if name == "embedding":
    return EMBEDDING
  if tuple(roles) == ("in", "in", "in", "out"):
    return CONV2D
  return LINEAR


def _split(roles: Sequence[str]) -> tuple[list[int], list[int]]:
  return [i for i, r in enumerate(roles) if r == "in"], [
    i for i, r in enumerate(roles) if r == "out"
  ]


def kernel_to_torch(w: np.ndarray, roles: Sequence[str], kind_: str) -> np.ndarray:
  """A Flax kernel (no stack axis) as the PyTorch module's ``weight``."""
  if kind_ == EMBEDDING:
    return w
  if kind_ == CONV2D:
    return w.transpose(3, 2, 0, 1)
  ins, outs = _split(roles)
  n_in = math.prod(w.shape[i] for i in ins)
  return w.transpose(ins + outs).reshape(n_in, -1).T


def kernel_from_torch(t: np.ndarray, shape: Sequence[int], roles: Sequence[str], kind_: str):
  """The inverse of :func:`kernel_to_torch`: a PyTorch ``weight`` as the kernel of ``shape``."""
  if kind_ == EMBEDDING:
    return t.reshape(shape)
  if kind_ == CONV2D:
    return t.transpose(2, 3, 1, 0).reshape(shape)
  ins, outs = _split(roles)
  grouped = t.T.reshape([shape[i] for i in ins + outs])
  return grouped.transpose(np.argsort(ins + outs))


def torch_weight_shape(shape: Sequence[int], roles: Sequence[str], kind_: str) -> tuple[int, ...]:
  if kind_ == EMBEDDING:
    return tuple(shape)
  if kind_ == CONV2D:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  ins, outs = _split(roles)
  return (math.prod(shape[i] for i in outs), math.prod(shape[i] for i in ins))


def factor_names(kind_: str) -> tuple[str, str]:
  """PEFT's names for A and B (without the ``.weight`` a Linear or Conv2d adds)."""
  if kind_ == EMBEDDING:
    return "lora_embedding_A", "lora_embedding_B"
  return "lora_A.weight", "lora_B.weight"


def factors_to_torch(a: np.ndarray, b: np.ndarray, kind_: str) -> tuple[np.ndarray, np.ndarray]:
  """One layer's ``a`` ``(r, *in)`` and ``b`` ``(r, *out)`` as PEFT's ``lora_A``, ``lora_B``."""
  r = a.shape[0]
  if kind_ == EMBEDDING:
    return a.reshape(r, -1), b.reshape(r, -1).T
  if kind_ == CONV2D:  # a: (r, kh, kw, in)
    return a.transpose(0, 3, 1, 2), b.reshape(r, -1).T[:, :, None, None]
  return a.reshape(r, -1), b.reshape(r, -1).T


def factor_shapes_torch(
  a_shape: Sequence[int], b_shape: Sequence[int], kind_: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes :func:`factors_to_torch` gives for factors of these shapes."""
  r, n_in, n_out = a_shape[0], math.prod(a_shape[1:]), math.prod(b_shape[1:])
  if kind_ == EMBEDDING:
    return (r, n_in), (n_out, r)
  if kind_ == CONV2D:
    kh, kw, cin = a_shape[1:]
    return (r, cin, kh, kw), (n_out, r, 1, 1)
  return (r, n_in), (n_out, r)


def factors_from_torch(
  a: np.ndarray, b: np.ndarray, a_shape: Sequence[int], b_shape: Sequence[int], kind_: str
) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of :func:`factors_to_torch` for one layer of shapes ``a_shape``, ``b_shape``."""
  if kind_ == CONV2D:
    return a.transpose(0, 2, 3, 1).reshape(a_shape), b.reshape(b.shape[0], -1).T.reshape(b_shape)
  return a.reshape(a_shape), b.T.reshape(b_shape)
