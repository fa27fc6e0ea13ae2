"""AdaLoRA: adapters in SVD form ``P·Λ·Q`` whose ranks an optax transformation prunes.

A leaf wrapped with ``adalora=True`` holds ``b`` (P, the left singular vectors), ``e``
(Λ, one value per rank and stacked layer) and ``a`` (Q, the right singular vectors) and
computes ``W·x + alpha / (r + 1e-5) · B·(E ⊙ A)·x``: a LoRA leaf whose ``A`` is ``E ⊙ A``,
so the forward stays low-rank and every kernel kind works (PEFT's ``SVDLinear``:
``lora_B @ (lora_A * lora_E) * scaling / (ranknum + 1e-5)``).

:func:`adalora` is PEFT's ``RankAllocator`` as an optax transformation: it adds the
gradient of the orthogonality regulariser, runs the inner optimiser, keeps the EMAs of
each factor entry's sensitivity ``|p·g|`` and its uncertainty, and sets to zero the ``Λ``
entries of the least important triplets to meet a budget that falls from ``init_r`` to
``target_r`` per matrix on PEFT's cubic schedule. Each stacked layer counts as a matrix,
as each is a module in PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_fn import _paths, _validate
from lorax_fn._leaves import is_adapter, is_lora

EPS = 1e-5
"""PEFT divides by ``ranknum + 1e-5``: the scale is ``alpha / (r + 1e-5)``."""

_FIELDS = ("a", "b", "e")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def init_factors(
  key: jax.Array, a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank_axis: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PEFT's AdaLoRA init: ``A, B ~ N(0, 0.02²)``, ``Λ = 0`` (so ``B·(Λ⊙A) = 0``)."""
  ka, kb = jax.random.split(key)
  a = 0.02 * jax.random.normal(ka, a_shape, dtype)
  b = 0.02 * jax.random.normal(kb, b_shape, dtype)
  return a, b, jnp.zeros(a_shape[: rank_axis + 1], dtype)


def effective_a(leaf: Any) -> jax.Array:
  """``Λ ⊙ A·r/(r + 1e-5)``: with it the leaf is a plain LoRA leaf of scale ``alpha / r``."""
  e = leaf.e.reshape(leaf.e.shape + (1,) * (leaf.a.ndim - leaf.e.ndim))
  return (leaf.a * e * (leaf.rank / (leaf.rank + EPS))).astype(leaf.a.dtype)


def is_adalora(x: object) -> bool:
  """True for a LoRA leaf in AdaLoRA's SVD form (one with singular values ``e``)."""
  return is_lora(x) and getattr(x, "e", None) is not None


def _adalora_leaves(tree: Any) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)[0]
  return {_paths.path_str(p): x for p, x in flat if is_adalora(x)}


def _at(tree: Any, paths: Mapping[str, Any], what: str) -> dict[str, Any]:
  """The LoRA nodes of ``tree`` at ``paths``; an error naming the first one missing."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None or is_adapter(x))
  nodes = {_paths.path_str(p): x for p, x in flat[0] if is_lora(x)}
  for p in paths:
    if p not in nodes or any(getattr(nodes[p], f) is None for f in _FIELDS):
      raise ValueError(
        f"{what} has no a, b and e at {p!r}, an AdaLoRA leaf of the params; pass the tree of "
        "the params' structure (or split's trainable half)"
      )
  return {p: nodes[p] for p in paths}


def _replace(tree: Any, new: Mapping[str, Any]) -> Any:
  def one(path: Any, x: Any) -> Any:
    return new.get(_paths.path_str(path), x) if is_lora(x) else x

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: x is None or is_adapter(x))


# ------------------------------------------------------------------------------------------
# The orthogonality regulariser
# ------------------------------------------------------------------------------------------


def _fro(x: jax.Array) -> jax.Array:
  """Frobenius norms over the last two axes, with a zero gradient at zero (not NaN)."""
  sq = jnp.sum(jnp.square(x), axis=(-2, -1))
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _rows(x: jax.Array, stack: int) -> jax.Array:
  """A factor ``stack + (r,) + rest`` as ``(layers, r, prod(rest))``."""
  shape = x.shape
  return x.reshape((math.prod(shape[:stack]), shape[stack], -1))


def orth_reg(factors: Mapping[str, tuple[jax.Array, jax.Array]], stacks: Mapping[str, int]):
  """PEFT's regulariser: the mean over every layer's A and B of ``‖AAᵀ - I‖_F`` and
  ``‖BᵀB - I‖_F`` (PEFT's ``B`` is ``(out, r)``; ours is its transpose)."""
  total, count = jnp.float32(0.0), 0
  for p, (a, b) in factors.items():
    for f in (_rows(a, stacks[p]), _rows(b, stacks[p])):
      gram = jnp.einsum("lri,lsi->lrs", f, f, precision=jax.lax.Precision.HIGHEST)
      total = total + jnp.sum(_fro(gram - jnp.eye(gram.shape[-1], dtype=gram.dtype)))
      count += f.shape[0]
  return total / count


# ------------------------------------------------------------------------------------------
# Budget and importance (PEFT's RankAllocator)
# ------------------------------------------------------------------------------------------


def budget_schedule(
  step: int,
  *,
  init_bgt: int,
  target_bgt: int,
  tinit: int,
  tfinal: int,
  total_step: int,
  deltaT: int,
) -> tuple[int, bool]:
  """PEFT's ``RankAllocator.budget_schedule``: ``(budget, mask now)`` at ``step``.

  ``init_bgt`` until ``tinit``, then ``target + (init - target)·(1 - progress)³`` (rounded
  down, masking every ``deltaT`` steps) until ``total_step - tfinal``, then ``target_bgt``.
  """
  if step <= tinit:
    return init_bgt, False
  if step > total_step - tfinal:
    return target_bgt, True
  mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
  budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
  return budget, step % deltaT == 0


def triplet_scores(exp_avg_ipt: Mapping, exp_avg_unc: Mapping, stacks: Mapping) -> dict:
  """Each triplet's importance: ``s(Λᵢ) + mean s(Aᵢ) + mean s(Bᵢ)`` with ``s = ipt·unc``."""
  out = {}
  for p, stack in stacks.items():
    score = {f: exp_avg_ipt[p][f] * exp_avg_unc[p][f] for f in _FIELDS}
    rows = [jnp.mean(score[f], axis=tuple(range(stack + 1, score[f].ndim))) for f in "ab"]
    out[p] = score["e"] + (rows[0] + rows[1])
  return out


class AdaLoraState(NamedTuple):
  """State of :func:`adalora`, keyed by the paths of the AdaLoRA leaves.

  Attributes:
    count: the step (PEFT's ``global_step``): 0 at the first update.
    inner: the inner transformation's state.
    exp_avg_ipt: per leaf and factor (``"a"``, ``"b"``, ``"e"``), the EMA of ``|p·g|``.
    exp_avg_unc: likewise, the EMA of ``|ipt - exp_avg_ipt|``.
    mask: per leaf, ``stack + (r,)`` bools: the triplets kept (PEFT's ``rank_pattern``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=4, targets=("k",),
    ...                  key=jax.random.key(0), adalora=True)
    >>> state = lora_fn.adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10).init(p)
    >>> isinstance(state, lora_fn.AdaLoraState), int(state.count), state.mask["k"].tolist()
    (True, 0, [True, True, True, True])
  """

  count: jax.Array
  inner: optax.OptState
  exp_avg_ipt: dict[str, dict[str, jax.Array]]
  exp_avg_unc: dict[str, dict[str, jax.Array]]
  mask: dict[str, jax.Array]


def adalora(
  tx: optax.GradientTransformation,
  *,
  init_r: int,
  target_r: int,
  total_step: int,
  tinit: int = 0,
  tfinal: int = 0,
  deltaT: int = 1,
  beta1: float = 0.85,
  beta2: float = 0.85,
  orth_reg_weight: float = 0.5,
) -> optax.GradientTransformation:
  """AdaLoRA's rank allocation around ``tx``, PEFT's ``RankAllocator`` as optax.

  Wrap with ``lorax_fn.wrap(params, rank=init_r, ..., adalora=True)``; then each update
  adds the gradient of ``orth_reg_weight`` times the orthogonality regulariser (PEFT adds it
  to the loss), runs ``tx``, updates the importance EMAs (``beta1``: sensitivity ``|p·g|``
  with the updated ``p``, ``beta2``: its uncertainty) and, on PEFT's schedule, zeroes the
  ``Λ`` entries of the least important triplets across all AdaLoRA leaves so that
  ``budget`` triplets stay: ``init_r`` per matrix until ``tinit``, a cubic fall to
  ``target_r`` per matrix at ``total_step - tfinal`` (a new mask every ``deltaT`` steps),
  then that mask fixed. Step ``t`` of the state is PEFT's ``update_and_allocate(t)`` after
  the optimiser step. :func:`adalora_ranks` reads the ranks.

  Args:
    tx: the inner transformation, e.g. ``lorax_fn.optimizer(optax.adamw(1e-3), params)``,
      or an optax one over :func:`split`'s trainable half.
    init_r: the rank the AdaLoRA leaves were wrapped with.
    target_r: the average rank per matrix at the end.
    total_step: the number of training steps.
    tinit: warm-up steps before pruning starts.
    tfinal: final steps with the ranks fixed.
    deltaT: steps between two new masks while the budget falls.
    beta1: EMA coefficient of the sensitivity.
    beta2: EMA coefficient of the uncertainty.
    orth_reg_weight: weight of the orthogonality regulariser (0: none).

  Returns:
    An ``optax.GradientTransformation`` whose state is an :class:`AdaLoraState`; its
    ``update`` needs ``params``.

  Raises:
    ValueError: ``target_r > init_r``, a schedule with no pruning phase
      (``tinit >= total_step - tfinal``), a beta outside ``(0, 1)``, a negative weight; at
      ``init``, params without AdaLoRA leaves or with a leaf of another rank.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=4, targets=("k",),
    ...                  key=jax.random.key(0), adalora=True)
    >>> tx = lora_fn.adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10)
    >>> state = tx.init(p)
    >>> lora_fn.adalora_ranks(state)
    {'k': 4}
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation; got: {tx!r}")
  init_r = _validate.positive_int("init_r", init_r)
  target_r = _validate.positive_int("target_r", target_r)
  if target_r > init_r:
    raise ValueError(f"target_r must be at most init_r = {init_r}; got: {target_r}")
  total_step = _validate.positive_int("total_step", total_step)
  tinit, tfinal = (_nonnegative(n, v) for n, v in (("tinit", tinit), ("tfinal", tfinal)))
  deltaT = _validate.positive_int("deltaT", deltaT)
  if tinit >= total_step - tfinal:
    raise ValueError(
      f"tinit must be below total_step - tfinal = {total_step - tfinal} (a pruning phase); got "
      f"tinit={tinit}, tfinal={tfinal}, total_step={total_step}"
    )
  for name, beta in (("beta1", beta1), ("beta2", beta2)):
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta < 1:
      raise ValueError(f"{name} must be in (0, 1); got: {beta!r}")
  if not isinstance(orth_reg_weight, (int, float)) or orth_reg_weight < 0:
    raise ValueError(f"orth_reg_weight must be a number >= 0; got: {orth_reg_weight!r}")
  boundary = total_step - tfinal
  schedule = dict(tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=deltaT)

  def leaves_of(params: Any) -> dict[str, Any]:
    leaves = _adalora_leaves(params)
    if not leaves:
      raise ValueError(
        "params hold no AdaLoRA leaf; wrap them with lorax_fn.wrap(..., rank=init_r, adalora=True)"
      )
    for p, leaf in leaves.items():
      if leaf.rank != init_r:
        raise ValueError(f"the AdaLoRA leaf at {p!r} has rank {leaf.rank}; init_r is {init_r}")
    return dict(sorted(leaves.items()))

  def init(params: Any) -> AdaLoraState:
    factors = {p: {f: getattr(x, f) for f in _FIELDS} for p, x in leaves_of(params).items()}
    count, ipt, unc, mask = _fresh(factors)
    return AdaLoraState(count, tx.init(params), ipt, unc, mask)

  def update(grads: Any, state: AdaLoraState, params: Any = None) -> tuple[Any, AdaLoraState]:
    if not isinstance(state, AdaLoraState):
      raise TypeError(
        "state must be the AdaLoraState that this adalora transformation's init returned (it "
        "holds the inner state, the importance scores and the masks); got: "
        f"{type(state).__name__}"
      )
    if params is None:
      raise ValueError("adalora's update needs params (the importance scores use them)")
    leaves = leaves_of(params)
    if set(state.mask) != set(leaves):
      raise ValueError(
        f"state holds AdaLoRA scores for {sorted(state.mask)[:4]} but params have AdaLoRA "
        f"leaves at {sorted(leaves)[:4]}; init the state from the params it updates"
      )
    stacks = {p: x.roles.count("stack") for p, x in leaves.items()}
    g_nodes = _at(grads, leaves, "grads")
    if orth_reg_weight:
      reg = jax.grad(orth_reg)({p: (x.a, x.b) for p, x in leaves.items()}, stacks)
      g_nodes = {
        p: dataclasses.replace(
          g,
          a=g.a + orth_reg_weight * reg[p][0].astype(g.a.dtype),
          b=g.b + orth_reg_weight * reg[p][1].astype(g.b.dtype),
        )
        for p, g in g_nodes.items()
      }
      grads = _replace(grads, g_nodes)
    updates, inner = tx.update(grads, state.inner, params)
    u_nodes = _at(updates, leaves, "the updates of tx")
    new = {
      p: {f: (getattr(x, f) + getattr(u_nodes[p], f)).astype(getattr(x, f).dtype) for f in _FIELDS}
      for p, x in leaves.items()
    }
    step = state.count
    learning = step < boundary
    ipt, unc = {}, {}
    for p in leaves:
      ipt[p], unc[p] = {}, {}
      for f in _FIELDS:
        now = jnp.abs(new[p][f] * getattr(g_nodes[p], f))
        avg = beta1 * state.exp_avg_ipt[p][f] + (1 - beta1) * now
        spread = beta2 * state.exp_avg_unc[p][f] + (1 - beta2) * jnp.abs(now - avg)
        ipt[p][f] = jnp.where(learning, avg, state.exp_avg_ipt[p][f])
        unc[p][f] = jnp.where(learning, spread, state.exp_avg_unc[p][f])
    init_bgt = sum(x.e.size for x in leaves.values())
    target_bgt = target_r * init_bgt // init_r
    table = [
      budget_schedule(t, init_bgt=init_bgt, target_bgt=target_bgt, **schedule)
      for t in range(boundary + 1)
    ]
    index = jnp.clip(step, 0, boundary)
    budget = jnp.asarray([b for b, _ in table], jnp.int32)[index]
    mask_now = jnp.asarray([m for _, m in table])[index]
    scores = triplet_scores(ipt, unc, stacks)
    fresh = _mask_to_budget(scores, init_bgt - budget)
    remask = (learning & mask_now) | (step == boundary)
    mask = {p: jnp.where(remask, fresh[p], state.mask[p]) for p in leaves}
    apply = remask | (step > boundary)
    e_updates = {
      p: jnp.where(apply & ~mask[p], -leaves[p].e, u_nodes[p].e).astype(u_nodes[p].e.dtype)
      for p in leaves
    }
    updates = _replace(
      updates, {p: dataclasses.replace(u, e=e_updates[p]) for p, u in u_nodes.items()}
    )
    reset = step == boundary  # PEFT's reset_ipt after fixing the ranks
    ipt, unc = (
      jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), t) for t in (ipt, unc)
    )
    return updates, AdaLoraState(step + 1, inner, ipt, unc, mask)

  return optax.GradientTransformation(init, update)


@jax.jit
def _fresh(factors: dict) -> tuple:
  """A new state's step, zero EMAs and full masks, in one compiled program."""
  mask = {p: jnp.ones(f["e"].shape, bool) for p, f in factors.items()}
  zeros = lambda: jax.tree.map(jnp.zeros_like, factors)
  return jnp.zeros((), jnp.int32), zeros(), zeros(), mask


def _nonnegative(what: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what} must be an int >= 0; got: {value!r}")
  return int(value)


def _mask_to_budget(scores: Mapping[str, jax.Array], k: jax.Array) -> dict[str, jax.Array]:
  """Keeps the triplets above the ``k``-th smallest score (all of them when ``k`` is 0)."""
  flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
  threshold = jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -jnp.inf)
  return {p: s > threshold for p, s in scores.items()}


def kept_triplets(leaves: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
  """Per AdaLoRA leaf, the triplets it keeps, and whether any rank was allocated yet.

  AdaLoRA zeroes the ``e`` of the triplets it prunes, so the kept ones are those with
  ``e != 0``; but every ``e`` is 0 at init, before any training step: until some ``e`` is
  not, nothing was allocated and every triplet is kept (PEFT's ``rank_pattern`` is
  ``None`` then and its ``save_pretrained`` writes ``init_r`` triplets per module).
  """
  es = {p: np.asarray(jax.device_get(x.e)) for p, x in leaves.items()}
  allocated = any(e.any() for e in es.values())
  return {p: e != 0 if allocated else np.ones(e.shape, bool) for p, e in es.items()}, allocated


def adalora_ranks(params_or_state: Any) -> dict[str, Any]:
  """The current rank of each AdaLoRA leaf, by its path.

  From an :class:`AdaLoraState` (or any optimiser state holding one), the triplets its mask
  keeps; from params, the non-zero entries of ``e`` (AdaLoRA zeroes the pruned ones), or
  the wrapped rank while every ``e`` is still zero (at init, before any allocation: as the
  state's mask, and as PEFT, which prunes nothing before its first mask). A scan-stacked
  kernel gets an array of ranks, one per layer.

  Raises:
    ValueError: if there is no AdaLoRA state or leaf in ``params_or_state``.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": {"kernel": jnp.ones((5, 7))}}, rank=3, targets=("fc",),
    ...                  key=jax.random.key(0), adalora=True)
    >>> lora_fn.adalora_ranks(p)  # Λ = 0 at init: nothing allocated yet
    {'fc/kernel': 3}
  """
  states = [
    x
    for x in jax.tree.leaves(params_or_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
    if isinstance(x, AdaLoraState)
  ]
  if isinstance(params_or_state, AdaLoraState):
    states = [params_or_state]
  if states:
    kept = states[0].mask
  else:
    leaves = _adalora_leaves(params_or_state)
    if not leaves:
      raise ValueError("adalora_ranks: no AdaLoRA state or AdaLoRA leaf (wrap(adalora=True))")
    kept = kept_triplets(leaves)[0]
  out = {}
  for path, keep in sorted(kept.items()):
    ranks = np.sum(np.asarray(keep), axis=-1)
    out[path] = int(ranks) if ranks.ndim == 0 else ranks
  return out
