"""Every use of JAX's jaxpr internals by ``lora`` and ``infer_layouts``, in one module.

The interpreter walks jaxprs from the public ``jax.make_jaxpr``. What it reads of them is
not all covered by JAX's compatibility promise: how a primitive is re-bound
(``Primitive.get_bind_params``, whose return type changed), the names of the
higher-order primitives (``pjit`` became ``jit`` in JAX 0.7) and the keys of their params,
and the ``Tracer`` type. All of that lives here, so a JAX upgrade touches this file only.

The params of first-order primitives (``dot_general``'s ``dimension_numbers``,
``transpose``'s ``permutation``, ...) are the keyword arguments of the public
``jax.lax`` function of the same name, and the rules read them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex

Literal = jex.Literal
# jax.extend.core has DropVar from JAX 0.10; before that only jax.core has it (which warns
# from 0.10 on).
DropVar = getattr(jex, "DropVar", None) or jax.core.DropVar

# Call-like primitives whose body is inlined, and the param holding the body.
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}
# Custom-derivative calls: the interpreter keeps them (their rule must survive), while
# ``infer_layouts`` looks through them.
CUSTOM_CALLS = {
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",  # the name before JAX 0.7
}
REMAT = "remat2"
SCAN = "scan"
COND = "cond"
WHILE = "while"


def name(eqn: Any) -> str:
  """The primitive's name, e.g. ``"dot_general"``."""
  return eqn.primitive.name


def is_literal(v: Any) -> bool:
  return isinstance(v, Literal)


def is_dropped(v: Any) -> bool:
  return isinstance(v, DropVar)


def is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
  """Binds ``eqn``'s primitive to ``invals`` with its params; always a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: Sequence[Any] = ()
  if isinstance(params, tuple):  # JAX before 0.7 returned (subfuns, params)
    subfuns, params = params
  out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def rebind(eqn: Any, *args: Any, **changes: Any) -> Any:
  """Binds a first-order primitive to ``args`` with its params, some of them changed."""
  return eqn.primitive.bind(*args, **(eqn.params | changes))


def call_body(eqn: Any) -> Any:
  """The ``ClosedJaxpr`` a call-like (``CALLS`` / ``CUSTOM_CALLS``) primitive runs."""
  return eqn.params[(CALLS | CUSTOM_CALLS)[name(eqn)]]


class RematParams(NamedTuple):
  jaxpr: Any  # an open jaxpr (no consts)
  prevent_cse: bool
  policy: Any


def remat_params(eqn: Any) -> RematParams:
  p = eqn.params
  return RematParams(p["jaxpr"], p["prevent_cse"], p["policy"])


class ScanParams(NamedTuple):
  num_consts: int
  num_carry: int
  body: Any  # ClosedJaxpr
  length: int
  reverse: bool
  unroll: Any


def scan_params(eqn: Any) -> ScanParams:
  p = eqn.params
  return ScanParams(
    p["num_consts"], p["num_carry"], p["jaxpr"], p["length"], p["reverse"], p["unroll"]
  )


def cond_branches(eqn: Any) -> list[Any]:
  """The branches (``ClosedJaxpr``) of a ``cond``; operand 0 is the branch index."""
  return list(eqn.params["branches"])


class WhileParams(NamedTuple):
  cond_nconsts: int
  body_nconsts: int
  cond: Any  # ClosedJaxpr
  body: Any  # ClosedJaxpr


def while_params(eqn: Any) -> WhileParams:
  p = eqn.params
  return WhileParams(p["cond_nconsts"], p["body_nconsts"], p["cond_jaxpr"], p["body_jaxpr"])
