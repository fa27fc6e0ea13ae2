"""``wrap``, ``merge`` and ``unwrap``: from a parameter pytree to LoRA leaves and back."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _adalora, _dora, _init, _paths, _validate
from lorax_fn._leaves import ROLES, Layout, LoraLeaf, factor_shapes, is_adapter, is_lora, is_stack
from lorax_fn._quant import is_quant

_ATTN_IN = ("query", "key", "value")  # Flax MultiHeadDotProductAttention: (in, heads, head_dim)
_ATTN_OUT = ("out",)  # (heads, head_dim, out)


def default_layout(path: str, shape: Sequence[int]) -> Layout:
  """The documented layout of a kernel from Flax's standard modules.

  ========================================  ======================================
  leaf                                       layout
  ========================================  ======================================
  any 2-D kernel (``Dense``, ``Embed``)      ``(in, out)``
  3-D ``query``/``key``/``value`` kernel     ``(in, out, out)`` (``DenseGeneral``)
  3-D attention ``out`` kernel               ``(in, in, out)``
  4-D ``query``/``key``/``value``/``out``    the above with a leading ``stack`` axis
  other 4-D ``kernel``                       ``(in, in, in, out)`` (2-D ``Conv``)
  ========================================  ======================================

  Anything else (a 3-D kernel could be a ``DenseGeneral``, an ``nn.scan``-stacked
  ``Dense`` or a 1-D ``Conv``) is ambiguous and raises: state the layout with
  ``layouts=`` or infer it with :func:`lorax_fn.infer_layouts`.

  Raises:
    ValueError: if the layout is ambiguous or the shape has fewer than 2 axes.
    TypeError: if ``path`` is not a str or ``shape`` not a tuple of ints.

  Example:
    >>> import lorax_fn as lora_fn
    >>> lora_fn.default_layout("encoder/attn/query/kernel", (768, 12, 64))
    ('in', 'out', 'out')
    >>> lora_fn.default_layout("stem/kernel", (16, 16, 3, 768))
    ('in', 'in', 'in', 'out')
  """
  if not isinstance(path, str):
    raise TypeError(f"path must be a '/'-joined str such as 'dense/kernel'; got: {path!r}")
  if not isinstance(shape, Sequence) or not all(isinstance(d, (int, np.integer)) for d in shape):
    raise TypeError(f"shape must be a tuple of ints; got: {shape!r}")
  parts = path.split("/")
  module = parts[-2] if len(parts) > 1 else ""
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f"LoRA needs a kernel of at least 2 axes; {path!r} has shape {tuple(shape)}")
  if ndim == 2:
    return ("in", "out")
  if module in _ATTN_IN and ndim in (3, 4):
    return ("stack",) * (ndim - 3) + ("in", "out", "out")
  if module in _ATTN_OUT and ndim in (3, 4):
    return ("stack",) * (ndim - 3) + ("in", "in", "out")
  if ndim == 4 and parts[-1] == "kernel":
    return ("in", "in", "in", "out")
  raise ValueError(
    f"the layout of the {ndim}-D kernel at {path!r} with shape {tuple(shape)} is "
    "ambiguous (a DenseGeneral, an nn.scan-stacked layer or a Conv?); pass "
    f"layouts={{{path!r}: (...)}} with one of {ROLES} per axis, or "
    "layouts=lorax_fn.infer_layouts(apply_fn, params, *example_inputs)."
  )


def _check_layout(path: str, shape: Sequence[int], layout: Any) -> Layout:
  layout = tuple(layout) if isinstance(layout, Sequence) and not isinstance(layout, str) else layout
  if (
    not isinstance(layout, tuple)
    or len(layout) != len(shape)
    or any(r not in ROLES for r in layout)
  ):
    raise ValueError(
      f"layout for {path!r} must give one of {ROLES} for each of the {len(shape)} axes "
      f"of shape {tuple(shape)}; got: {layout!r}"
    )
  if "in" not in layout or "out" not in layout:
    raise ValueError(
      f"layout for {path!r} needs at least one 'in' and one 'out' axis; got: {layout!r}"
    )
  return layout


def _init_factors(
  key: jax.Array, path: str, leaf: jax.Array, layout: Layout, rank: int, init: str, dtype: Any
) -> tuple[jax.Array, jax.Array]:
  a_shape, b_shape = factor_shapes(leaf.shape, layout, rank)
  fan_in = math.prod(d for d, r in zip(leaf.shape, layout, strict=True) if r == "in")
  if path.split("/")[-1] == "embedding":
    # PEFT's embedding LoRA is the other way round: A = 0, B ~ N(0, 1).
    return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
  if init == "kaiming":  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
  else:  # "gaussian": PEFT draws A with std 1/r
    a = jax.random.normal(key, a_shape, dtype) / rank
  return a, jnp.zeros(b_shape, dtype)


def _flatten(params: Any) -> tuple[list[tuple[str, Any]], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: is_adapter(x) or is_quant(x)
  )
  return [(_paths.path_str(p), x) for p, x in leaves], treedef


def wrap(
  params: Any,
  *,
  rank: int = 8,
  targets: _paths.Targets,
  key: jax.Array,
  alpha: float | None = None,
  init: str = "kaiming",
  loftq_iter: int | None = None,
  loftq_quant: Mapping[str, Any] | None = None,
  dtype: Any = None,
  rslora: bool = False,
  dropout: float = 0.0,
  dora: bool = False,
  adalora: bool = False,
  rank_pattern: Mapping[str, int] | None = None,
  alpha_pattern: Mapping[str, float] | None = None,
  layouts: Mapping[str, Sequence[str]] | None = None,
  kernel_names: Sequence[str] = _paths.KERNEL_NAMES,
) -> Any:
  """Replaces each targeted kernel of ``params`` by a :class:`LoraLeaf`.

  Args:
    params: any pytree of arrays (Flax linen variables, an NNX ``State``, a dict).
    rank: LoRA rank ``r`` (overridable per target with ``rank_pattern``).
    targets: names matched against path components (``("query", "value")`` selects
      ``.../query/kernel``), a regex over the ``"/"``-joined path, or a callable
      ``(path, leaf) -> bool``. Names, and a regex matching only part of a path, select only
      kernels and embedding tables; a regex matching a whole path selects that leaf.
    key: PRNG key; each targeted leaf gets its own subkey.
    alpha: LoRA alpha; ``None`` means ``alpha = rank`` (each leaf's own rank, so scale 1).
    init: ``"kaiming"`` (PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
      B = 0) or ``"gaussian"`` (A ~ N(0, 1/r²)); embeddings then use A = 0, B ~ N(0, 1).
      Inits that change the base as PEFT's do (the leaf's ``w`` is no longer the kernel
      given, and :func:`unwrap` returns it): ``"pissa"`` (B, A from the top-``r`` singular
      triplets of W, ``w = W - s·BA``), ``"pissa_niter_K"`` (the same by randomized SVD
      with ``K`` subspace iterations, drawn from the leaf's key), ``"olora"`` (B, A from
      ``W = QR``, ``w = W - s·BA``) and ``"loftq"`` (``w`` an NF4 :class:`QuantLeaf` and
      ``s·BA`` the rank-``r`` fit of its error). Each works on the ``(out, in)`` matrix of
      every stacked layer, PyTorch's weight. See :func:`lorax_fn.save_peft` ``initial=``
      for the export against the original base.
    loftq_iter: LoftQ's alternating quantise / SVD rounds (default 1).
    loftq_quant: ``{"block_size": 64, "double_quant": True, "torch_order": False}`` (the
      defaults): the settings of :func:`lorax_fn.quantize` for LoftQ's NF4 base.
    dtype: dtype of A and B; default float32 for 16-bit bases, else the base dtype.
    rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the input of the low-rank path (see :func:`lora`).
    dora: DoRA (weight-decomposed LoRA): each leaf also gets a trainable magnitude ``m``,
      one per output unit (and stacked layer), initialised to the norms of ``W + s·BA``
      over the ``"in"`` axes, and computes ``m / ‖W + s·BA‖ ⊙ (W·x + s·B·A·x)`` with the
      norm detached from the gradient, as PEFT's ``use_dora=True``.
    adalora: AdaLoRA's SVD form (PEFT's ``AdaLoraConfig``): each leaf gets singular values
      ``e`` (Λ, zeros) beside ``a`` and ``b`` (``N(0, 0.02²)``), computes
      ``W·x + alpha/(rank + 1e-5)·B·(Λ ⊙ A)·x``, and :func:`lorax_fn.adalora` prunes its
      ranks from ``rank`` (PEFT's ``init_r``). Not with ``dora``, ``rslora`` or an ``init``.
    rank_pattern: ``{pattern: rank}``; the first key that matches a path wins (as in
      PEFT). Every key must match a targeted parameter.
    alpha_pattern: ``{pattern: alpha}``, likewise.
    layouts: ``{pattern: roles}`` with a role in ``("in", "out", "stack")`` per kernel
      axis, overriding :func:`default_layout`; :func:`infer_layouts` returns one. Every key
      must match a parameter; keys that are paths of a tree holding ``params`` (the
      ``"params/..."`` keys of ``infer_layouts(model.apply, {"params": params}, x)``) are
      matched by the path they name within ``params``.
    kernel_names: leaf names that target names may select.

  Returns:
    A new pytree of the same structure with :class:`LoraLeaf` nodes at the targets.

  Raises:
    ValueError: if a target name, a regex or a pattern key matches nothing, a rank, alpha or
      option is invalid, a layout is ambiguous, or a leaf is already wrapped.
    TypeError: if a targeted leaf is not a float array, or an option has the wrong type.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> params = {"dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)}}
    >>> wrapped = lora_fn.wrap(params, rank=2, targets=("dense",), key=jax.random.key(0))
    >>> wrapped["dense"]["kernel"].a.shape, wrapped["dense"]["kernel"].b.shape
    ((2, 5), (2, 7))

    DoRA adds a magnitude per output unit, the column norms of ``W`` at init:

    >>> w = jnp.arange(35.0).reshape(5, 7) / 35
    >>> d = lora_fn.wrap({"k": w}, rank=2, targets=("k",), key=jax.random.key(0), dora=True)
    >>> d["k"].m.shape, bool(jnp.allclose(d["k"].m, jnp.linalg.norm(w, axis=0)))
    ((7,), True)

    PiSSA moves the principal part into the factors; the base is the residual:

    >>> p = lora_fn.wrap({"k": w}, rank=2, targets=("k",), key=jax.random.key(0), init="pissa")
    >>> p["k"].base_init, bool(jnp.allclose(lora_fn.merge(p)["k"], w, atol=1e-6))
    ('pissa', True)

    AdaLoRA's SVD form adds singular values ``e`` (zero at init) for :func:`lorax_fn.adalora`:

    >>> a = lora_fn.wrap({"k": w}, rank=3, targets=("k",), key=jax.random.key(0), adalora=True)
    >>> a["k"].e
    Array([0., 0., 0.], dtype=float32)
  """
  init = _init.check_init(init)
  loftq = _init.loftq_options(init, loftq_iter, loftq_quant)
  dropout = _validate.rate("dropout", dropout)
  rank = _validate.positive_int("rank", rank)
  if alpha is not None:
    alpha = _validate.positive_number("alpha", alpha, " (or None: alpha = rank)")
  rslora = _validate.boolean("rslora", rslora)
  dora = _validate.boolean("dora", dora)
  adalora = _validate.boolean("adalora", adalora)
  if adalora and (dora or rslora or init != "kaiming"):
    got = "dora=True" if dora else "rslora=True" if rslora else f"init={init!r}"
    raise ValueError(f"adalora=True has its own init and scale, and no DoRA (as PEFT's); got {got}")
  dtype = _validate.float_dtype("dtype of the factors", dtype)
  _validate.prng_key("key", key)
  if isinstance(kernel_names, str) or not all(isinstance(n, str) for n in kernel_names):
    raise TypeError(f"kernel_names must be a sequence of leaf names; got: {kernel_names!r}")
  flat, treedef = _flatten(params)
  paths = [p for p, _ in flat]
  selected = _paths.select(targets, paths, [x for _, x in flat], kernel_names)
  targeted = [paths[i] for i in selected]
  matrices = [p for p, x in flat if np.ndim(x.w if is_lora(x) else x) >= 2 or is_quant(x)]
  layouts = _paths.check_patterns("layouts", layouts, paths, matrices, "parameter of 2+ axes")
  for k, v in layouts.items():
    if isinstance(v, str) or not isinstance(v, Sequence):
      raise ValueError(f"layouts[{k!r}] must give one of {ROLES} per kernel axis; got: {v!r}")
  rank_pattern = _paths.check_patterns(
    "rank_pattern", rank_pattern, paths, targeted, "targeted parameter"
  )
  alpha_pattern = _paths.check_patterns(
    "alpha_pattern", alpha_pattern, paths, targeted, "targeted parameter"
  )
  rank_pattern = rank_pattern.map(lambda k, v: _validate.positive_int(f"rank_pattern[{k!r}]", v))
  alpha_pattern = alpha_pattern.map(
    lambda k, v: _validate.positive_number(f"alpha_pattern[{k!r}]", v)
  )
  keys = jax.random.split(key, len(selected))
  out = [leaf for _, leaf in flat]
  for k, i in zip(keys, selected, strict=True):
    path, leaf = flat[i]
    out[i] = _wrap_leaf(
      k,
      path,
      leaf,
      rank=_or(rank_pattern.lookup(path), rank),
      alpha=_or(alpha_pattern.lookup(path), alpha),
      init=init,
      loftq=loftq,
      adalora=adalora,
      dtype=dtype,
      rslora=rslora,
      dropout=dropout,
      layout=layouts.lookup(path),
    )
    if dora:
      out[i] = _dora.with_magnitude(out[i])
  return jax.tree_util.tree_unflatten(treedef, out)


def _or(value: Any, default: Any) -> Any:
  return default if value is None else value


def _wrap_leaf(
  key: jax.Array,
  path: str,
  leaf: Any,
  *,
  rank: int,
  alpha: float | None,
  init: str,
  loftq: tuple[int, Mapping[str, Any]],
  adalora: bool,
  dtype: Any,
  rslora: bool,
  dropout: float,
  layout: Sequence[str] | None,
) -> LoraLeaf:
  if is_adapter(leaf):
    raise ValueError(f"the leaf at {path!r} is already a LoRA leaf; wrap it only once.")
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
    got = getattr(leaf, "dtype", type(leaf).__name__)
    raise TypeError(f"the targeted leaf at {path!r} must be a float array; got: {got}")
  if leaf.ndim < 2:
    raise ValueError(
      f"the targeted leaf at {path!r} must have at least 2 axes; got shape {leaf.shape}"
    )
  layout = default_layout(path, leaf.shape) if layout is None else layout
  layout = _check_layout(path, leaf.shape, layout)
  n_in = math.prod(d for d, r in zip(leaf.shape, layout, strict=True) if r == "in")
  n_out = math.prod(d for d, r in zip(leaf.shape, layout, strict=True) if r == "out")
  if rank > min(n_in, n_out):
    raise ValueError(
      f"rank for {path!r} must be at most min(in, out) = min({n_in}, {n_out}) for a kernel "
      f"of shape {tuple(leaf.shape)} with layout {layout}; got: {rank}"
    )
  if dtype is None:
    dtype = jnp.float32 if jnp.finfo(leaf.dtype).bits < 32 else leaf.dtype
  alpha = float(rank if alpha is None else alpha)
  e, base_init = None, None
  if _init.changes_base(init):
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    leaf, a, b = _init.init_base(key, path, leaf, layout, int(rank), scale, init, dtype, loftq)
    base_init = init
  elif adalora:
    a_shape, b_shape = factor_shapes(leaf.shape, layout, int(rank))
    a, b, e = _adalora.init_factors(key, a_shape, b_shape, layout.count("stack"), dtype)
  else:
    a, b = _init_factors(key, path, leaf, layout, int(rank), init, dtype)
  return LoraLeaf(
    leaf, a, b, layout, int(rank), alpha, bool(rslora), float(dropout), e=e, base_init=base_init
  )


def merge(params: Any, *, dtype: Any = None) -> Any:
  """Folds every LoRA leaf into one dense kernel ``W + scale * B·A``.

  The result has the original structure, shapes and dtypes, so the model runs with no
  extra latency and no ``lora`` transform.

  Args:
    params: a pytree that may hold :class:`LoraLeaf` nodes.
    dtype: dtype of the merged kernels; default each base kernel's dtype.

  Returns:
    A plain pytree of arrays.

  Raises:
    TypeError: if ``dtype`` is not a float dtype.
    ValueError: if a LoRA leaf's factors do not fit its base (the path is named).

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.eye(3)}, rank=1, targets=("k",), key=jax.random.key(0))
    >>> bool((lora_fn.merge(p)["k"] == jnp.eye(3)).all())  # B = 0 at init
    True
  """

  dtype = _validate.float_dtype("merge dtype (None: each base's)", dtype)
  is_node = lambda x: is_adapter(x) or is_quant(x)
  if not any(is_node(x) for x in jax.tree.leaves(params, is_leaf=is_node)):
    raise ValueError(
      "merge: params hold no LoRA or quantised leaf, so there is nothing to merge; pass the "
      "tree returned by lorax_fn.wrap."
    )

  def one(path: Any, x: Any) -> Any:
    if is_stack(x):
      raise ValueError(
        f"merge: {_paths.path_str(path)!r} holds a stack of {x.slots} adapters; merge one of "
        "them: merge(unstack_adapter(params, slot))"
      )
    if is_lora(x):
      x.check(_paths.path_str(path))
      return x.merged(dtype)
    return x.dequantize(dtype) if is_quant(x) else x

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def unwrap(params: Any) -> Any:
  """Returns the base pytree: every LoRA leaf replaced by its frozen ``w``, bit-exact.

  After ``wrap(..., init="pissa" | "olora" | "loftq")`` that is the base the model holds, as
  PEFT's base layer holds it: the residual ``W - s·B₀A₀`` (or LoftQ's NF4 ``Q``), not the
  kernel given to ``wrap``, which is ``merge`` of the freshly wrapped tree.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"k": jnp.arange(6.0).reshape(2, 3)}
    >>> p = lora_fn.wrap(base, rank=1, targets=("k",), key=jax.random.key(0))
    >>> lora_fn.unwrap(p)["k"] is base["k"]
    True
  """

  def one(path: Any, x: Any) -> Any:
    if not is_adapter(x):
      return x
    if x.w is None:
      raise ValueError(
        f"unwrap: the LoRA leaf at {_paths.path_str(path)!r} has no base w (None): it is the "
        "trainable half of lorax_fn.split; unwrap(combine(trainable, frozen))."
      )
    return x.w

  if not any(is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter)):
    raise ValueError("unwrap: params hold no LoRA leaf; pass the tree returned by lorax_fn.wrap.")
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_adapter)


def lora_paths(params: Any) -> dict[str, LoraLeaf]:
  """``{path: leaf}`` of the LoRA leaves of ``params``."""
  return {p: x for p, x in _flatten(params)[0] if is_lora(x)}
