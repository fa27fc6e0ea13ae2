"""``weighted_adapter``: one adapter from several, PEFT's ``add_weighted_adapter`` methods.

Each LoRA kernel is handled as one matrix per stacked layer: ``A`` ``(r, in)`` and ``B``
``(r, out)`` with the kernel's in and out axes flattened in kernel order (PEFT's ``lora_A``
and ``lora_B`` transposed). The result has ``alpha = rank`` (scale 1), as PEFT's has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate
from lorax_fn._leaves import LoraLeaf, factor_axes, is_lora
from lorax_fn._stack import _check_column, _flat

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _as_matrices(leaf: LoraLeaf) -> tuple[np.ndarray, np.ndarray]:
  """``a`` as ``(layers, r, in)`` and ``b`` as ``(layers, r, out)``, in float64."""
  a_axes, b_axes = factor_axes(leaf.roles)
  stack = a_axes.index(None)
  layers = math.prod(np.shape(leaf.a)[:stack])
  a = np.asarray(leaf.a, np.float64).reshape(layers, leaf.rank, -1)
  b = np.asarray(leaf.b, np.float64).reshape(layers, leaf.rank, -1)
  return a, b


def _from_matrices(leaf: LoraLeaf, a: np.ndarray, b: np.ndarray, dtype: Any) -> LoraLeaf:
  r = a.shape[1]
  a_axes, b_axes = factor_axes(leaf.roles)
  a_shape = [r if i is None else leaf.shape[i] for i in a_axes]
  b_shape = [r if i is None else leaf.shape[i] for i in b_axes]
  return LoraLeaf(
    leaf.w,
    jnp.asarray(a.reshape(a_shape), dtype),
    jnp.asarray(b.reshape(b_shape), dtype),
    leaf.roles,
    r,
    float(r),
    False,
    leaf.dropout,
  )


def _prune_magnitude(x: np.ndarray, density: float) -> np.ndarray:
  """Keeps the ``int(density * size)`` largest magnitudes of each layer (PEFT's top-k)."""
  if density >= 1:
    return x
  out = np.zeros_like(x)
  for layer in range(x.shape[0]):
    flat = x[layer].reshape(-1)
    k = int(density * flat.size)
    if k:
      top = np.argpartition(-np.abs(flat), k - 1)[:k]
      kept = np.zeros_like(flat)
      kept[top] = flat[top]
      out[layer] = kept.reshape(x[layer].shape)
  return out


def _prune_random(x: np.ndarray, density: float, key: jax.Array) -> np.ndarray:
  """DARE: keeps each entry with probability ``density`` and rescales by ``1 / density``."""
  if density >= 1:
    return x
  keep = np.asarray(jax.random.bernoulli(key, density, x.shape))
  return x * keep / density


def _merge(
  method: str, tensors: list[np.ndarray], weights: np.ndarray, density, keys
) -> np.ndarray:
  """PEFT's task arithmetic, TIES, DARE or magnitude pruning over one factor of each adapter."""
  if method in ("ties", "magnitude_prune"):
    tensors = [_prune_magnitude(t, density) for t in tensors]
  elif method.startswith("dare"):
    tensors = [_prune_random(t, density, k) for t, k in zip(tensors, keys, strict=True)]
  stacked = np.stack(tensors)
  weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
  if method in ("ties", "dare_ties"):
    # The elected sign: of the sum of the (pruned, unweighted) tensors; disjoint mean.
    sign = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == sign
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
  return weighted.sum(axis=0)


def _svd(column: list[LoraLeaf], weights: Sequence[float], rank: int | None) -> tuple:
  """The best rank-k factors of ``Σ wᵢ·sᵢ·Bᵢᵀ·Aᵢ`` from the factors (QR, then a small SVD)."""
  mats = [_as_matrices(x) for x in column]
  k = rank or max(x.rank for x in column)
  a_cat = np.concatenate([a for a, _ in mats], axis=1)  # (layers, R, in)
  b_cat = np.concatenate(
    [w * x.scale * b for (_, b), x, w in zip(mats, column, weights, strict=True)], axis=1
  )  # (layers, R, out)
  q_b, r_b = np.linalg.qr(np.swapaxes(b_cat, 1, 2))  # (layers, out, m), (layers, m, R)
  q_a, r_a = np.linalg.qr(np.swapaxes(a_cat, 1, 2))  # (layers, in, n), (layers, n, R)
  u, s, vt = np.linalg.svd(r_b @ np.swapaxes(r_a, 1, 2))  # ΔWᵀ-free: (out, in) = q_b M q_aᵀ
  u = (q_b @ u)[..., :k] * s[:, None, :k]  # (layers, out, k): B (PEFT's orientation)
  v = (q_a @ np.swapaxes(vt, 1, 2))[..., :k]  # (layers, in, k)
  pad = k - u.shape[-1]  # a rank above min(out, in, R): zero directions
  if pad > 0:
    u = np.pad(u, [(0, 0), (0, 0), (0, pad)])
    v = np.pad(v, [(0, 0), (0, 0), (0, pad)])
  return np.swapaxes(v, 1, 2), np.swapaxes(u, 1, 2)


def _combine_leaf(method, column, weights, rank, density, key) -> LoraLeaf:
  dtype = column[0].a.dtype
  if method == "svd":
    a, b = _svd(column, weights, rank)
    return _from_matrices(column[0], a, b, dtype)
  mats = [_as_matrices(x) for x in column]
  scaled = np.asarray([w * x.scale for w, x in zip(weights, column, strict=True)])
  if method == "cat":
    a = np.concatenate([s * a for (a, _), s in zip(mats, scaled, strict=True)], axis=1)
    b = np.concatenate([b for _, b in mats], axis=1)
    return _from_matrices(column[0], a, b, dtype)
  # PEFT splits each weight over both factors: sqrt(|w s|) on B, its sign on A as well.
  w_a = np.sign(scaled) * np.sqrt(np.abs(scaled))
  w_b = np.sqrt(np.abs(scaled))
  keys = (
    list(jax.random.split(key, 2 * len(column))) if key is not None else [None] * (2 * len(column))
  )
  a = _merge(method, [a for a, _ in mats], w_a, density, keys[::2])
  b = _merge(method, [b for _, b in mats], w_b, density, keys[1::2])
  return _from_matrices(column[0], a, b, dtype)


def weighted_adapter(
  adapters: Sequence[Any],
  weights: Sequence[float],
  *,
  method: str,
  rank: int | None = None,
  density: float | None = None,
  key: jax.Array | None = None,
) -> Any:
  """One adapter mixed from several over one base, as PEFT's ``add_weighted_adapter``.

  Methods:

  * ``"cat"``: exactly ``Σ wᵢ·ΔWᵢ``, the ranks concatenated;
  * ``"svd"``: the best rank-``rank`` (default: the largest rank) approximation of
    ``Σ wᵢ·ΔWᵢ``, computed from the factors (QR of the stacked factors and an SVD of a
    ``Σrᵢ``-sized matrix: no full ``ΔW`` is formed);
  * ``"linear"``: ``Σ sign·sqrt|wᵢsᵢ|·Aᵢ`` and ``Σ sqrt|wᵢsᵢ|·Bᵢ`` (equal ranks; approximate);
  * ``"ties"``, ``"magnitude_prune"``: the same on factors pruned to their ``density``
    largest entries, TIES electing a sign and averaging the agreeing entries;
  * ``"dare_linear"``, ``"dare_ties"``: random pruning (``key``) rescaled by ``1/density``.

  Args:
    adapters: wrapped trees over one base with the same targets and layouts.
    weights: one weight per adapter (negative weights subtract).
    method: one of the above.
    rank: the rank of ``"svd"``'s result.
    density: the kept fraction, in (0, 1], for the pruning methods.
    key: the PRNG key of the DARE methods.

  Returns:
    A wrapped tree with the mixed adapter (``alpha = rank``, so scale 1).

  Raises:
    ValueError: an unknown method, weights of the wrong length or not finite, a density
      outside (0, 1] or missing, a missing key, different ranks where the method needs
      equal ones, or adapters over other bases, targets or layouts (the path is named).

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": jnp.ones((5, 7))}
    >>> p1 = lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(0))
    >>> p2 = lora_fn.wrap(base, rank=3, targets=("fc",), key=jax.random.key(1))
    >>> lora_fn.weighted_adapter([p1, p2], [0.5, 0.5], method="cat")["fc"].rank
    5
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got: {method!r}")
  if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence) or not adapters:
    raise ValueError(f"adapters must be a non-empty sequence of wrapped trees; got: {adapters!r}")
  weights = np.asarray(weights, np.float64) if not isinstance(weights, (str, bytes)) else None
  if weights is None or weights.shape != (len(adapters),) or not np.isfinite(weights).all():
    raise ValueError(
      f"weights must hold {len(adapters)} finite numbers, one per adapter; got: {weights!r}"
    )
  if method in _DENSITY:
    if density is None:
      raise ValueError(f"method {method!r} needs density, the kept fraction in (0, 1]")
    density = _validate.positive_number("density", density)
    if density > 1:
      raise ValueError(f"density must be in (0, 1]; got: {density}")
  elif density is not None:
    raise ValueError(f"density is for the pruning methods {_DENSITY}; method is {method!r}")
  if method.startswith("dare"):
    if key is None:
      raise ValueError(f"method {method!r} prunes at random: pass key=")
    _validate.prng_key("key", key)
  if rank is not None:
    if method != "svd":
      raise ValueError(f"rank is for method 'svd'; method is {method!r}")
    rank = _validate.positive_int("rank", rank)
  flats = [_flat(p) for p in adapters]
  flat, treedef = flats[0]
  if any(other != treedef for _, other in flats[1:]):
    raise ValueError("adapters have different tree structures (other targets?)")
  keys = iter(jax.random.split(key, len(flat))) if key is not None else None
  out = []
  for i, (path, leaf) in enumerate(flat):
    column = [f[i][1] for f, _ in flats]
    _check_column(path, column, what="weighted_adapter mixes")
    if not is_lora(leaf):
      out.append(leaf)
      continue
    ranks = {x.rank for x in column}
    if method in _SAME_RANK and len(ranks) > 1:
      raise ValueError(
        f"method {method!r} needs adapters of one rank; at {path!r} they have ranks "
        f"{sorted(ranks)} (use 'cat' or 'svd')"
      )
    out.append(_combine_leaf(method, column, weights, rank, density, next(keys) if keys else None))
  if not any(is_lora(x) for x in out):
    raise ValueError("adapters hold no LoRA leaf; pass trees returned by lorax_fn.wrap")
  return jax.tree_util.tree_unflatten(treedef, out)
