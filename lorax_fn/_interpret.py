"""The jaxpr interpreter behind ``lora(fn)``: LoRA leaves stay factored through a jaxpr.

:mod:`lorax_fn._transform` traces ``fn`` once to a jaxpr with each LoRA leaf replaced by an
abstract array of its base weight's shape; :func:`eval_jaxpr` then evaluates it with the real
leaves bound to those inputs as :class:`~lorax_fn._values.LoraVal` values. Primitives that
meet a LoRA value use a view rule (:mod:`lorax_fn._views`) or a compute rule
(:mod:`lorax_fn._rules`); higher-order primitives are rebuilt with ``lax.scan``/``lax.switch``/
``lax.while_loop``/``jax.checkpoint`` around an interpreted body; anything else materialises
``W + s·BA`` and warns once. Only public JAX API is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lorax_fn import _jaxpr
from lorax_fn._quant_leaf import QuantSlice
from lorax_fn._rules import COMPUTE_RULES, dot_general_rule, first_step_plan, shared_first_steps
from lorax_fn._values import LazyBase, LoraVal, NoRule, dense
from lorax_fn._views import VIEW_RULES


class MaterializeWarning(UserWarning):
  """A LoRA kernel met an operation with no factored rule and was materialised."""


class _Ctx:
  """Per-call state: the dropout key and a counter that gives each LoRA site its own key."""

  def __init__(self, key: jax.Array | None):
    self.key = key
    self.count = 0

  def next_key(self) -> jax.Array:
    assert self.key is not None
    self.count += 1
    return jax.random.fold_in(self.key, self.count)

  def can_share(self, invals: Sequence[Any]) -> bool:
    """Sites may share ``x·Aᵀ`` unless dropout gives each its own mask."""
    return self.key is None or all(x.dropout == 0.0 for x in invals if isinstance(x, LoraVal))

  def dropout(self, x: jax.Array, rate: float) -> jax.Array:
    if self.key is None or rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.next_key(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _concrete(x: Any) -> Any:
  return x.materialize() if isinstance(x, LoraVal) else x


def eval_jaxpr(ctx: _Ctx, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Evaluates ``jaxpr``; values may be arrays or :class:`LoraVal`."""
  env: dict[Any, Any] = {}

  def read(v: Any) -> Any:
    return v.val if _jaxpr.is_literal(v) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  shared: dict[int, Any] = {}  # eqn index -> x·Aᵀ computed together with a sibling site
  uses = None
  for idx, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, LoraVal) for x in invals):
      if _jaxpr.name(eqn) == "dot_general" and idx not in shared and ctx.can_share(invals):
        uses = _dot_uses(jaxpr) if uses is None else uses
        shared.update(_share_first_steps(ctx, jaxpr, idx, invals, env, uses))
      outs = _eval_lora_eqn(ctx, eqn, invals, shared.pop(idx, None))
    else:
      outs = _jaxpr.bind(eqn, invals)
    for var, val in zip(eqn.outvars, outs, strict=True):
      if not _jaxpr.is_dropped(var):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _dot_uses(jaxpr: Any) -> dict[Any, list[tuple[int, int]]]:
  """``{var: [(eqn index, operand position)]}`` for every ``dot_general`` operand."""
  uses: dict[Any, list[tuple[int, int]]] = {}
  for idx, eqn in enumerate(jaxpr.eqns):
    if _jaxpr.name(eqn) == "dot_general":
      for pos, v in enumerate(eqn.invars):
        if not _jaxpr.is_literal(v):
          uses.setdefault(v, []).append((idx, pos))
  return uses


def _share_first_steps(ctx, jaxpr, idx, invals, env, uses) -> dict[int, Any]:
  """Computes ``x·Aᵀ`` of this site and of later sites reading the same ``x`` in one matmul."""
  plan = first_step_plan(jaxpr.eqns[idx], *invals)
  if plan is None:
    return {}
  x_var = jaxpr.eqns[idx].invars[plan.x_pos]
  group = [(idx, plan)]
  for j, pos in uses.get(x_var, ()):
    eqn = jaxpr.eqns[j]
    if (
      j <= idx
      or pos != plan.x_pos
      or any(not _jaxpr.is_literal(v) and v not in env for v in eqn.invars)
    ):
      continue
    vals = [v.val if _jaxpr.is_literal(v) else env[v] for v in eqn.invars]
    other = first_step_plan(eqn, *vals) if ctx.can_share(vals) else None
    if other is not None and (other.x_dims, other.dtype, other.precision) == (
      plan.x_dims,
      plan.dtype,
      plan.precision,
    ):
      group.append((j, other))
  if len(group) == 1:
    return {}
  results = shared_first_steps(invals[plan.x_pos], [p for _, p in group])
  return {j: r for (j, _), r in zip(group, results, strict=True)}


def _eval_lora_eqn(ctx: _Ctx, eqn: Any, invals: list[Any], first: Any = None) -> list[Any]:
  name = _jaxpr.name(eqn)
  if first is not None:
    return [dot_general_rule(eqn, *invals, ctx.dropout, first)]
  try:
    if name in VIEW_RULES and isinstance(invals[0], LoraVal):
      if not any(isinstance(x, LoraVal) for x in invals[1:]):
        return [VIEW_RULES[name](eqn, *invals)]
    elif name in COMPUTE_RULES:
      lora_inputs = [i for i, x in enumerate(invals) if isinstance(x, LoraVal)]
      if len(lora_inputs) > 1:  # e.g. W1 @ W2: keep one factored, form the other
        invals[lora_inputs[0]] = _materialize(invals[lora_inputs[0]], name)
      return [COMPUTE_RULES[name](eqn, *invals, ctx.dropout)]
    elif name in _HIGHER_ORDER:
      return _HIGHER_ORDER[name](ctx, eqn, invals)
  except NoRule:
    pass
  return _jaxpr.bind(eqn, [_materialize(x, name) for x in invals])


def _materialize(x: Any, primitive: str) -> Any:
  if not isinstance(x, LoraVal):
    return x
  warnings.warn(
    f"lorax_fn.lora: no factored rule for '{primitive}' on a LoRA kernel of shape "
    f"{x.shape}; materialising W + s*BA (correct, but slower and uses more memory).",
    MaterializeWarning,
    stacklevel=2,
  )
  return x.materialize()


# ----------------------------------------------------------------------------------------
# Higher-order primitives.
# ----------------------------------------------------------------------------------------


def _call_rule(ctx: _Ctx, eqn: Any, invals: list[Any]) -> list[Any]:
  closed = _jaxpr.call_body(eqn)
  return eval_jaxpr(ctx, closed.jaxpr, closed.consts, invals)


def _checkpoint_rule(ctx: _Ctx, eqn: Any, invals: list[Any]) -> list[Any]:
  p = _jaxpr.remat_params(eqn)

  def body(*args: Any) -> list[Any]:
    return [_concrete(o) for o in eval_jaxpr(ctx, p.jaxpr, (), args)]

  return list(jax.checkpoint(body, prevent_cse=p.prevent_cse, policy=p.policy)(*invals))


def _scan_slices(v: LoraVal) -> tuple[tuple[Any, ...], Callable[[tuple[Any, ...]], LoraVal]]:
  """Splits a LoRA value scanned over its axis 0 into scanned parts and a rebuild fn."""

  def lead(f, axes):
    if 0 not in axes:
      return None, f, tuple(None if i is None else i - 1 for i in axes)
    j = axes.index(0)
    rest = axes[:j] + axes[j + 1 :]
    return jnp.moveaxis(f, j, 0), None, tuple(None if i is None else i - 1 for i in rest)

  a_xs, a_const, a_axes = lead(v.a, v.a_axes)
  b_xs, b_const, b_axes = lead(v.b, v.b_axes)
  g_xs, g_const, g_axes = (None, None, ()) if v.g is None else lead(v.g, v.g_axes)

  def rebuild(parts: tuple[Any, ...]) -> LoraVal:
    w, a, b, g = parts
    return LoraVal(
      w,
      a_const if a is None else a,
      b_const if b is None else b,
      a_axes,
      b_axes,
      v.scale,
      v.dropout,
      g_const if g is None else g,
      g_axes,
    )

  w = v.w
  if isinstance(w, LazyBase) and w.elementwise and w.q.sliceable():
    # Scan over layer indices and decode only the current layer inside the body.
    stack, views = w.q, w.views
    parts = (jnp.arange(stack.shape[0]), a_xs, b_xs, g_xs)

    def rebuild_quant(parts: tuple[Any, ...]) -> LoraVal:
      i, a, b, g = parts
      return rebuild((LazyBase(QuantSlice(stack, i), views, True), a, b, g))

    return parts, rebuild_quant
  return (dense(w), a_xs, b_xs, g_xs), rebuild  # views that move axis 0: decoded whole


def _scan_rule(ctx: _Ctx, eqn: Any, invals: list[Any]) -> list[Any]:
  p = _jaxpr.scan_params(eqn)
  nc, ncar = p.num_consts, p.num_carry
  consts = invals[:nc]
  init = [_materialize(x, "scan carry") for x in invals[nc : nc + ncar]]
  xs, rebuilds = [], []
  for x in invals[nc + ncar :]:
    if isinstance(x, LoraVal):
      parts, rebuild = _scan_slices(x)
      xs.append(parts)
      rebuilds.append(rebuild)
    else:
      xs.append(x)
      rebuilds.append(None)
  keys = None if ctx.key is None else jax.random.split(ctx.next_key(), p.length)

  def body(carry: list[Any], x: tuple[list[Any], Any]) -> tuple[list[Any], list[Any]]:
    x_vals, k = x
    x_vals = [x if r is None else r(x) for x, r in zip(x_vals, rebuilds, strict=True)]
    outs = eval_jaxpr(_Ctx(k), p.body.jaxpr, p.body.consts, [*consts, *carry, *x_vals])
    outs = [_concrete(o) for o in outs]
    return outs[:ncar], outs[ncar:]

  carry, ys = lax.scan(body, init, (xs, keys), length=p.length, reverse=p.reverse, unroll=p.unroll)
  return [*carry, *ys]


def _cond_rule(ctx: _Ctx, eqn: Any, invals: list[Any]) -> list[Any]:
  index, ops = invals[0], invals[1:]

  def branch(closed: Any) -> Callable[..., list[Any]]:
    return lambda *args: [_concrete(o) for o in eval_jaxpr(ctx, closed.jaxpr, closed.consts, args)]

  return list(lax.switch(index, [branch(b) for b in _jaxpr.cond_branches(eqn)], *ops))


def _while_rule(ctx: _Ctx, eqn: Any, invals: list[Any]) -> list[Any]:
  p = _jaxpr.while_params(eqn)
  cn, bn = p.cond_nconsts, p.body_nconsts
  cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
  init = [_materialize(x, "while carry") for x in invals[cn + bn :]]
  key = None if ctx.key is None else ctx.next_key()

  def cond_fun(c: tuple[list[Any], Any]) -> Any:
    return eval_jaxpr(ctx, p.cond.jaxpr, p.cond.consts, [*cconsts, *c[0]])[0]

  def body_fun(c: tuple[list[Any], Any]) -> tuple[list[Any], Any]:
    carry, i = c
    sub = _Ctx(None if key is None else jax.random.fold_in(key, i))
    outs = eval_jaxpr(sub, p.body.jaxpr, p.body.consts, [*bconsts, *carry])
    return [_concrete(o) for o in outs], i + 1

  out, _ = lax.while_loop(cond_fun, body_fun, (init, jnp.zeros((), jnp.int32)))
  return list(out)


# custom_jvp_call / custom_vjp_call are not inlined: that would drop the user's derivative
# rule; the fallback materialises W + s·BA and keeps it.
_HIGHER_ORDER: dict[str, Callable[[_Ctx, Any, list[Any]], list[Any]]] = {
  **{name: _call_rule for name in _jaxpr.CALLS},
  _jaxpr.REMAT: _checkpoint_rule,
  _jaxpr.SCAN: _scan_rule,
  _jaxpr.COND: _cond_rule,
  _jaxpr.WHILE: _while_rule,
}
