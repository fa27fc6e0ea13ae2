"""Inits that change the base: PiSSA and OLoRA (a residual base), LoftQ (a quantised one).

Each works on the kernel as PyTorch sees it: one ``(out, in)`` matrix per stacked layer, the
``"out"`` axes flattened in kernel order into rows and the ``"in"`` axes into columns (a
``Linear``'s weight; permuting rows or columns permutes the factors alike, so the SVD and QR
are PEFT's in any layout). The leaf's base ``w`` then holds what PEFT's base layer holds:

* ``"pissa"``: ``W - s·BA`` with ``B = U_r·√(S_r/s)``, ``A = √(S_r/s)·V_rᵀ`` from the SVD of
  ``W`` (``"pissa_niter_K"``: PyTorch's ``svd_lowrank`` with ``K`` subspace iterations, the
  random test matrix drawn from the leaf's key);
* ``"olora"``: ``W - s·BA`` with ``B = Q[:, :r]``, ``A = R[:r]`` from ``W = QR``;
* ``"loftq"``: ``Q``, the NF4 code of ``W - s·BA``, alternated with ``s·BA`` the rank-``r`` SVD
  of ``W - Q`` (LoftQ, as PEFT's ``loftq_init``).

So ``w + s·BA`` is ``W`` to float tolerance (for PiSSA and OLoRA) at the start of training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _validate
from lorax_fn._quant import is_quant, quantize_array

INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_<K>", "olora", "loftq")
"""The values of ``wrap(..., init=)``; ``<K>`` is a number of subspace iterations."""

REDERIVED = ("pissa", "olora")
"""PEFT ``init_lora_weights`` whose residual base ``load_peft`` re-derives from the original."""
_NITER = re.compile(r"pissa_niter_(\d+)")
_LOFTQ_QUANT = {"block_size": 64, "double_quant": True, "torch_order": False}
_HIGHEST = jax.lax.Precision.HIGHEST  # PEFT computes in float32; TPUs would use bf16 passes


def check_init(init: Any) -> str:
  """``init`` if it is one of :data:`INITS`; else a ``ValueError`` listing them."""
  if isinstance(init, str) and (init in INITS or _NITER.fullmatch(init)):
    return init
  raise ValueError(f"init must be one of {INITS}; got: {init!r}")


def changes_base(init: str) -> bool:
  """Whether ``init`` replaces the base weight (PiSSA, OLoRA, LoftQ)."""
  return init in ("pissa", "olora", "loftq") or bool(_NITER.fullmatch(init))


def loftq_options(init: str, loftq_iter: Any, loftq_quant: Any) -> tuple[int, dict[str, Any]]:
  """Checked ``(iterations, quantize settings)`` for LoftQ; errors if given for another init."""
  if init != "loftq":
    for name, value in (("loftq_iter", loftq_iter), ("loftq_quant", loftq_quant)):
      if value is not None:
        raise ValueError(f"{name} applies to init='loftq' only; got init={init!r}")
    return 1, {}
  iters = 1 if loftq_iter is None else _validate.positive_int("loftq_iter", loftq_iter)
  quant = dict(_LOFTQ_QUANT)
  if loftq_quant is not None:
    if not isinstance(loftq_quant, Mapping) or set(loftq_quant) - set(_LOFTQ_QUANT):
      raise ValueError(
        f"loftq_quant must be a mapping with keys among {tuple(_LOFTQ_QUANT)} (the settings of "
        f"lorax_fn.quantize for the NF4 base); got: {loftq_quant!r}"
      )
    quant.update(loftq_quant)
  block = _validate.positive_int("loftq_quant['block_size']", quant["block_size"])
  if block & (block - 1):
    raise ValueError(f"loftq_quant['block_size'] must be a power of two; got: {block!r}")
  for flag in ("double_quant", "torch_order"):
    quant[flag] = _validate.boolean(f"loftq_quant[{flag!r}]", quant[flag])
  return iters, quant


# ------------------------------------------------------------------------------------------
# Kernels as PyTorch's (out, in) matrices, one per stacked layer
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
  shape: tuple[int, ...]
  roles: tuple[str, ...]

  def axes(self, role: str) -> list[int]:
    return [i for i, r in enumerate(self.roles) if r == role]

  def dims(self, role: str) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.axes(role))

  @property
  def perm(self) -> list[int]:
    return self.axes("stack") + self.axes("out") + self.axes("in")

  def matrix(self, w: jax.Array) -> jax.Array:
    """``(*stack, out, in)`` in float32."""
    n_out, n_in = math.prod(self.dims("out")), math.prod(self.dims("in"))
    m = jnp.transpose(jnp.asarray(w, jnp.float32), self.perm)
    return m.reshape(self.dims("stack") + (n_out, n_in))

  def kernel(self, m: jax.Array) -> jax.Array:
    """The inverse of :meth:`matrix`."""
    m = m.reshape(self.dims("stack") + self.dims("out") + self.dims("in"))
    return jnp.transpose(m, np.argsort(self.perm))

  def factors(self, b: jax.Array, a: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``lora_A`` ``(*stack, r, in)`` and ``lora_B`` ``(*stack, out, r)`` as ours."""
    r = a.shape[-2]
    stack = self.dims("stack")
    a = a.reshape(stack + (r,) + self.dims("in"))
    b = jnp.swapaxes(b, -1, -2).reshape(stack + (r,) + self.dims("out"))
    return a.astype(dtype), b.astype(dtype)


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


# ------------------------------------------------------------------------------------------
# PiSSA, OLoRA
# ------------------------------------------------------------------------------------------


def svd_lowrank(m: jax.Array, q: int, niter: int, omega: jax.Array):
  """PyTorch's ``torch.svd_lowrank`` (Halko et al. 2009, algorithm 5.1) with a given test
  matrix ``omega`` ``(*batch, min(rows, cols), q)``: ``(U, S, V)``, ``m ≈ U·diag(S)·Vᵀ``."""
  wide = m.shape[-2] < m.shape[-1]
  x = _t(m) if wide else m  # tall
  basis = jnp.linalg.qr(_mm(x, omega))[0]
  for _ in range(niter):
    basis = jnp.linalg.qr(_mm(_t(x), basis))[0]
    basis = jnp.linalg.qr(_mm(x, basis))[0]
  u, s, vh = jnp.linalg.svd(_mm(_t(basis), x), full_matrices=False)
  u, v = _mm(basis, u), _t(vh)
  return (v, s, u) if wide else (u, s, v)


def pissa_matrices(
  m: jax.Array, rank: int, scale: float, niter: int | None = None, omega: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``pissa_init`` on ``(*stack, out, in)`` matrices: ``(lora_B, lora_A)``."""
  if niter is None:
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
  else:
    u, s, v = svd_lowrank(m, rank, niter, omega)
    vh = _t(v)
  root = jnp.sqrt(s / scale)
  return u * root[..., None, :], root[..., :, None] * vh


def olora_matrices(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``olora_init`` on ``(*stack, out, in)`` matrices: ``(lora_B, lora_A)``."""
  q, r = jnp.linalg.qr(m)
  return q[..., :, :rank], r[..., :rank, :]


def _omega(key: jax.Array, m: jax.Array, rank: int) -> jax.Array:
  rows, cols = m.shape[-2:]
  return jax.random.normal(key, m.shape[:-2] + (min(rows, cols), rank), jnp.float32)


# ------------------------------------------------------------------------------------------
# LoftQ
# ------------------------------------------------------------------------------------------


def _lowrank(m: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """PEFT's ``_low_rank_decomposition`` (``L = U√S``, ``R = √S·Vh``) with ``s·L·R`` the
  rank-``r`` SVD: PEFT's LoftQ leaves the scale out (peft#1982), which is right for
  ``alpha = rank`` only."""
  u, s, vh = jnp.linalg.svd(m, full_matrices=False)
  root = jnp.sqrt(s[..., :rank] / scale)
  return u[..., :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def loftq_factors(
  w: jax.Array,
  view: _View,
  rank: int,
  scale: float,
  iters: int,
  quant: Mapping[str, Any],
  dtype: Any,
) -> tuple[Any, jax.Array, jax.Array]:
  """LoftQ: ``(QuantLeaf, a, b)`` (this library's layouts, ``dtype``), ``Q + s·BA`` close to ``w``.

  As PEFT's ``loftq_init``: ``Q`` is the NF4 code of ``W - s·BA`` (of ``W`` at first) and
  ``s·BA`` the rank-``r`` SVD of ``W - Q``, ``iters`` times.
  """
  res = np.asarray(jax.device_get(w)).astype(np.float32)
  for _ in range(iters):
    q = quantize_array(res, "nf4", **quant)
    a, b, res = _loftq_round(w, q, view, rank, scale, jnp.dtype(dtype))
  return dataclasses.replace(q, dtype_name=jnp.dtype(w.dtype).name), a, b


@functools.partial(jax.jit, static_argnums=(2, 3, 5))
def _loftq_round(w: jax.Array, q: Any, view: _View, rank: int, scale: Any, dtype: Any):
  """``(a, b)`` of ``s·BA``, the rank-``r`` fit of ``W - Q``, and ``W - s·BA`` for the next
  round, in one compiled program per kernel shape."""
  target = view.matrix(w)
  b, a = _lowrank(target - view.matrix(q.dequantize(jnp.float32)), rank, scale)
  return (*view.factors(b, a, dtype), view.kernel(target - scale * _mm(b, a)))


# ------------------------------------------------------------------------------------------
# The entry point of wrap
# ------------------------------------------------------------------------------------------


def init_base(
  key: jax.Array,
  path: str,
  leaf: Any,
  roles: Sequence[str],
  rank: int,
  scale: float,
  init: str,
  dtype: Any,
  loftq: tuple[int, Mapping[str, Any]],
) -> tuple[Any, jax.Array, jax.Array]:
  """``(w, a, b)`` for an init that changes the base; ``w`` is what the model's base becomes."""
  if is_quant(leaf):
    fix = (
      "LoftQ quantises the float base itself: pass the unquantised params"
      if init == "loftq"
      else "wrap the float params, then quantise the residual base (lorax_fn.quantize(wrapped, "
      "'nf4', targets=...)), or use init='loftq'"
    )
    raise ValueError(
      f"init={init!r} needs the float weight, but the base at {path!r} is already quantised "
      f"({leaf.kind}); {fix}"
    )
  view = _View(tuple(leaf.shape), tuple(roles))
  if init == "loftq":
    return loftq_factors(leaf, view, rank, scale, *loftq, dtype)
  return _residual_init(leaf, key, view, rank, scale, init, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 5, 6))
def _residual_init(w, key, view: _View, rank: int, scale: Any, init: str, dtype: Any):
  """PiSSA / OLoRA: ``(W - s·BA, a, b)``, one compiled program per kernel shape (the scale
  is traced: every alpha and rsLoRA share it)."""
  m = view.matrix(w)
  if init == "olora":
    b, a = olora_matrices(m, rank)
  else:
    niter = _NITER.fullmatch(init)
    niter = int(niter[1]) if niter else None
    omega = None if niter is None else _omega(key, m, rank)
    b, a = pissa_matrices(m, rank, scale, niter, omega)
  residual = view.kernel(m - scale * _mm(b, a)).astype(w.dtype)
  a, b = view.factors(b, a, dtype)
  return residual, a, b


# ------------------------------------------------------------------------------------------
# Export: a plain LoRA against the original base (PEFT's convert_pissa_to_lora)
# ------------------------------------------------------------------------------------------


def check_export_base(loras: Mapping[str, Any], initial: Any, residual_base: bool) -> None:
  """``save_peft``'s choice of base for leaves whose init changed it, or a ``ValueError``.

  ``initial=`` writes a plain LoRA against the original kernels (exact for PiSSA and OLoRA,
  not for LoftQ, whose ``Q`` is not ``W - s·B₀A₀``); ``residual_base=True`` writes the
  adapter against the base in params; without either, such a leaf is an error: PEFT and
  vLLM would load the adapter onto the original model and compute something else.
  """
  changed = {p: x.base_init for p, x in sorted(loras.items()) if x.base_init is not None}
  if initial is not None and residual_base:
    raise ValueError(
      "save_peft: initial= writes the adapter against the original base and "
      "residual_base=True against the base in params; pass one of them"
    )
  if changed and initial is None and not residual_base:
    init = next(iter(changed.values()))
    raise ValueError(
      f"save_peft: {list(changed)[:4]} were wrapped with init={init!r}, so their base is not "
      "the original kernel any more (unwrap(params) returns it) and an adapter written "
      "against it is wrong on the original model, which PEFT and vLLM load it onto. Pass "
      "initial=<the tree wrap returned, before training> to write a plain LoRA against the "
      "original base (PEFT's conversion; vLLM serves it), or residual_base=True to write it "
      "against the base in params, which you then ship with it"
    )
  loftq = [p for p, init in changed.items() if init == "loftq"]
  if initial is not None and loftq:
    raise ValueError(
      f"save_peft: initial= converts PiSSA and OLoRA adapters exactly, but {loftq[:4]} are "
      "LoftQ's, whose quantised base is not W - s·B₀A₀ (the conversion would be off by "
      "LoftQ's error); write them with residual_base=True and ship their base "
      "(lorax_fn.unwrap(params), dequantised) with them, as PEFT's LoftQ recipe does"
    )


def initial_factors(initial: Any, loras: Mapping[str, Any]) -> dict[str, Any]:
  """The leaves of ``initial`` at the paths of ``loras``, checked to be their starting point."""
  from lorax_fn._leaves import is_adapter, is_lora
  from lorax_fn._paths import path_str

  flat = jax.tree_util.tree_flatten_with_path(initial, is_leaf=lambda x: is_adapter(x))[0]
  firsts = {path_str(p): x for p, x in flat if is_lora(x)}
  if not firsts:
    raise ValueError(
      "initial holds no LoRA leaf; pass the tree lorax_fn.wrap returned (before training), or "
      "its trainable half from lorax_fn.split"
    )
  missing = sorted(set(loras) - set(firsts))
  if missing:
    raise ValueError(f"initial has no LoRA leaf at {missing[:4]}, which params adapt")
  for path, leaf in loras.items():
    first = firsts[path]
    if leaf.m is not None or leaf.e is not None:
      kind = "DoRA" if leaf.m is not None else "AdaLoRA"
      raise ValueError(f"initial= converts LoRA adapters; {path!r} is {kind}")
    mine = (leaf.rank, leaf.alpha, leaf.rslora, leaf.roles, leaf.base_init)
    mine += (np.shape(leaf.a), np.shape(leaf.b))
    theirs = (first.rank, first.alpha, first.rslora, first.roles, first.base_init)
    theirs += (np.shape(first.a), np.shape(first.b))
    if mine != theirs:
      raise ValueError(
        f"initial at {path!r} (rank {first.rank}, alpha {first.alpha:g}, rslora "
        f"{first.rslora}, layout {first.roles}, init {first.base_init}) is not the start of "
        f"the adapter in params (rank {leaf.rank}, alpha {leaf.alpha:g}, rslora "
        f"{leaf.rslora}, layout {leaf.roles}, init {leaf.base_init})"
      )
  return {p: firsts[p] for p in loras}


def convert_to_plain(
  leaf: Any, a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, float]:
  """``ΔW = s·BA - s·B₀A₀`` as a rank-``2r`` adapter ``([A; A₀], [B, -B₀])`` of the same scale.

  PEFT's ``subtract_mutated_init``: with ``W = w + s·B₀A₀`` the original kernel (the base
  before PiSSA / OLoRA took the principal part out), ``W + ΔW = w + s·BA``. Returns the
  factors, the rank ``2r`` and the alpha that keeps the scale (``2·alpha``, ``√2·alpha``
  with rsLoRA).
  """
  axis = leaf.roles.count("stack")
  a_out = np.concatenate([a, a0.astype(a.dtype)], axis=axis)
  b_out = np.concatenate([b, -b0.astype(b.dtype)], axis=axis)
  alpha = leaf.alpha * (math.sqrt(2) if leaf.rslora else 2)
  return a_out, b_out, 2 * leaf.rank, alpha


def peft_base(
  where: str, path: str, leaf: Any, roles: Sequence[str], rank: int, scale: float, init: str
) -> Any:
  """The residual base of a PEFT adapter saved with ``init_lora_weights=init`` (``"pissa"``,
  ``"olora"``): PEFT loads one by running the init on the original base again."""
  from lorax_fn._leaves import is_adapter

  if is_adapter(leaf):
    raise ValueError(
      f"{where} has init_lora_weights={init!r}: its base is the residual of the original "
      f"kernel, so {path!r} must be the original kernel, not a LoRA leaf"
    )
  key = jax.random.key(0)  # unused: "pissa" and "olora" draw nothing
  return init_base(key, path, leaf, roles, rank, scale, init, jnp.float32, (1, {}))[0]
