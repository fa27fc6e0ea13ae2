"""Shared test helpers: an explicit LoRA formula and tree-aware assertions."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

import lorax_fn as lora_fn


def explicit_delta(leaf: lora_fn.LoraLeaf) -> np.ndarray:
  """``(alpha/rank)·B·A`` in the kernel's axis order, by plain numpy reshapes and a matmul."""
  roles, shape = leaf.roles, leaf.shape
  stack = [i for i, r in enumerate(roles) if r == "stack"]
  ins = [i for i, r in enumerate(roles) if r == "in"]
  outs = [i for i, r in enumerate(roles) if r == "out"]
  s = math.prod(shape[i] for i in stack)
  a = np.asarray(leaf.a, np.float64).reshape(s, leaf.rank, -1).transpose(0, 2, 1)
  b = np.asarray(leaf.b, np.float64).reshape(s, leaf.rank, -1)
  delta = (leaf.alpha / leaf.rank) * (a @ b)  # (stack, in, out)
  delta = delta.reshape([shape[i] for i in stack + ins + outs])
  return np.transpose(delta, np.argsort(stack + ins + outs))


def explicit_merge(params):
  def one(x):
    if lora_fn.is_lora(x):
      return (np.asarray(x.w, np.float64) + explicit_delta(x)).astype(np.asarray(x.w).dtype)
    return x

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def randomize(params, key, scale=0.5):
  """Gives every LoRA leaf random non-zero A and B."""
  leaves = [x for x in jax.tree.leaves(params, is_leaf=lora_fn.is_lora) if lora_fn.is_lora(x)]
  keys = iter(jax.random.split(key, 2 * len(leaves)))

  def one(x):
    if not lora_fn.is_lora(x):
      return x
    return dataclasses.replace(
      x,
      a=scale * jax.random.normal(next(keys), x.a.shape, x.a.dtype),
      b=scale * jax.random.normal(next(keys), x.b.shape, x.b.dtype),
    )

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def assert_trees_close(actual, expected, rtol=1e-5, atol=0.0):
  """Relative closeness per leaf, relative to the leaf's largest magnitude; names the path."""
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e, strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
    err = np.abs(a - e).max() if a.size else 0.0
    bound = rtol * max(np.abs(e).max() if e.size else 0.0, 1e-30) + atol
    assert err <= bound, f"{jax.tree_util.keystr(path)}: max error {err:.3g} > {bound:.3g}"


def assert_trees_equal(actual, expected):
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


def all_eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the sub-jaxprs in its parameters (scan, cond, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from all_eqns(inner)
