"""``lora(fn)``: the transform that runs ``fn`` with LoRA leaves kept factored.

``fn`` is traced once per signature to a jaxpr with each LoRA leaf replaced by an abstract
array of its base weight's shape (the traces are cached, least recently used evicted); the
jaxpr is then evaluated by :func:`lorax_fn._interpret.eval_jaxpr` with the real leaves bound to
those inputs. Per-example adapters (``adapter_ids``) run through
:func:`lorax_fn._per_example.run_per_example`.
"""

from __future__ import annotations

import collections
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lorax_fn import _jaxpr, _paths, _validate
from lorax_fn._interpret import _concrete, _Ctx, eval_jaxpr
from lorax_fn._leaves import LoraLeaf, is_lora, is_stack
from lorax_fn._per_example import run_per_example
from lorax_fn._quant import is_quant
from lorax_fn._quant_leaf import QuantLeaf
from lorax_fn._stack import _is_node
from lorax_fn._values import LoraVal


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, LoraLeaf, QuantLeaf))


def _stand_in(x: Any) -> jax.ShapeDtypeStruct:
  if is_lora(x):
    x = x.w
  if is_quant(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  aval = jax.typeof(x) if isinstance(x, jax.Array) else None
  weak = bool(getattr(aval, "weak_type", False))
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, weak_type=weak)


def _bind_value(x: Any) -> Any:
  """The interpreter's value for an argument leaf; a quantised base is decoded in the trace."""
  if is_lora(x):
    return LoraVal.from_leaf(x)
  return x.dequantize() if is_quant(x) else x


def _check_leaves(args: Any) -> None:
  flat, _ = jax.tree_util.tree_flatten_with_path(args, is_leaf=lambda x: is_lora(x) or is_stack(x))
  for path, x in flat:
    if is_lora(x) or is_stack(x):
      x.check(
        f"arg {path[1].idx if path[0].idx == 0 else path[1].key!r}/" + _paths.path_str(path[2:])
      )


_CACHE_SIZE = 64  # traces kept per transformed function, least recently used evicted


def lora(fn: Callable[..., Any], *, key: jax.Array | None = None) -> Callable[..., Any]:
  """Transforms ``fn`` to run LoRA leaves in its arguments as ``W·x + s·B(A·x)``.

  Like ``jax.grad``, ``lora`` returns a function with ``fn``'s signature. Wherever a
  :class:`LoraLeaf` reaches ``fn``, matmuls (``dot_general`` with any contracting and batch
  dimensions), convolutions and embedding lookups use the factored form, through casts,
  transposes, reshapes and slices and inside ``jit``, ``scan``, ``remat``, ``cond`` and
  ``while``; ``W + s·BA`` is never formed and no gradient reaches the base ``W``. Any other
  use of a LoRA leaf materialises ``W + s·BA`` (correct, slower) with a
  :class:`MaterializeWarning` naming the operation. Composes with ``jit``, ``grad``,
  ``vmap``; works with Flax linen (``lora(model.apply)``), NNX (through
  ``nnx.split``/``nnx.merge``) and plain functions.

  The transformed function takes one keyword of its own, ``dropout_key``: a PRNG key for
  LoRA dropout (the ``dropout`` rate given to :func:`wrap`). Dropout is applied only when
  it is given, so leave it out at evaluation. Build the transform once and pass a new key
  each step (``apply(params, x, dropout_key=jax.random.fold_in(key, step))``): the key is
  data, so a new key never retraces ``fn``.

  With stacked adapters (:func:`stack_adapters`, :class:`AdapterPool`) it also takes
  ``adapter_ids``: one slot per example (``-1``: the base alone). The arguments that hold
  the parameters (any LoRA, stacked or quantised leaf) are shared; every other array
  argument is per example along its axis 0 (the example axis), and every output keeps that
  axis first. Row ``i`` of the output is what example ``i`` alone gives with its adapter:
  each example runs as a batch of one with its slot's factors gathered, all in one vmapped
  program (no ``W + s·BA`` per adapter). Gradients reach only the slots used, so several
  adapters train at once on one mixed batch. Where that rule guesses wrong (a Flax
  ``"cache"`` collection passed beside the params, a lookup table every example shares), say
  which arguments are per example with ``per_example=``: positional indices and keyword
  names; every other argument is then shared. Each example gathers its slot's factors (a
  copy of A and B per example, not a per-site grouped kernel), so memory grows with the
  batch times the adapter size; the base weights are never copied.

  ``fn`` is traced once per signature: the tree structure of the arguments, the shapes and
  dtypes of their arrays, and the values of their other leaves (Python scalars, strings:
  static, as ``jit``'s static arguments). As with ``jax.jit``, values ``fn`` closes over are
  read when it is traced and are constants of that trace; a later change to them is not
  seen, so pass anything that changes as an argument. The last 64 traces are kept, least
  recently used first out.

  Args:
    fn: the function to transform.
    key: deprecated: a dropout key fixed when the transform is built. Pass
      ``dropout_key=`` to the transformed function instead.

  Returns:
    The transformed function, called as ``fn`` is, plus the optional ``dropout_key``,
    ``adapter_ids`` and ``per_example``.

  Raises:
    ValueError: stacked adapters without ``adapter_ids`` (or the reverse), ids out of
      ``[-1, slots)`` (checked when they are concrete; traced ones out of range count as
      ``-1``), or a per-example argument whose axis 0 does not have one entry per id.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> params = lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",),
    ...                       key=jax.random.key(0), dropout=0.1)
    >>> f = lambda p, x: x @ p["w"]
    >>> apply = lora_fn.lora(f)
    >>> y = apply(params, jnp.ones((3, 5)))  # evaluation: no dropout
    >>> bool(jnp.allclose(y, f(lora_fn.merge(params), jnp.ones((3, 5)))))
    True
    >>> y = apply(params, jnp.ones((3, 5)), dropout_key=jax.random.key(1))  # training
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable, e.g. model.apply; got: {fn!r}")
  taken = sorted({"dropout_key", "adapter_ids", "per_example"} & _parameters(fn))
  if taken:
    raise TypeError(
      f"fn has a parameter named {taken[0]}, which the transformed function takes for itself "
      "(LoRA dropout, per-example adapters) and would never pass on; rename fn's parameter"
    )
  if key is not None:
    _validate.prng_key("key", key)
    warnings.warn(
      "lorax_fn.lora(fn, key=k) is deprecated: it fixes the dropout key when the transform "
      "is built. Build it once and pass dropout_key=k to the transformed function.",
      DeprecationWarning,
      stacklevel=2,
    )
  cache: collections.OrderedDict[Any, Any] = collections.OrderedDict()
  built_key = key

  def single(args: tuple, kwargs: dict, dropout_key: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=_is_node)
    dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    stand_ins = [_stand_in(leaves[i]) for i in dyn]
    closed, out_tree = _trace(fn, cache, leaves, treedef, dyn, stand_ins)
    vals = [_bind_value(x) for x in (leaves[i] for i in dyn)]
    outs = eval_jaxpr(_Ctx(dropout_key), closed.jaxpr, closed.consts, vals)
    return jax.tree_util.tree_unflatten(out_tree, [_concrete(o) for o in outs])

  @functools.wraps(fn)
  def wrapped(
    *args: Any,
    dropout_key: jax.Array | None = None,
    adapter_ids: Any = None,
    per_example: Any = None,
    **kwargs: Any,
  ) -> Any:
    leaves = jax.tree.leaves((args, kwargs), is_leaf=_is_node)
    if not any(_is_node(x) for x in leaves):
      if adapter_ids is not None:
        raise ValueError("adapter_ids was given, but no argument holds stacked adapters")
      return fn(*args, **kwargs)
    _check_leaves((args, kwargs))
    if dropout_key is not None:
      _validate.prng_key("dropout_key", dropout_key)
    key = built_key if dropout_key is None else dropout_key
    if adapter_ids is not None:
      return run_per_example(single, args, kwargs, adapter_ids, key, per_example)
    if per_example is not None:
      raise ValueError("per_example is for adapter_ids: give both, or neither")
    if any(is_stack(x) for x in leaves):
      raise ValueError(
        "params hold stacked adapters (lorax_fn.stack_adapters): pass adapter_ids=, one slot "
        "per example (-1: the base alone)"
      )
    return single(args, kwargs, key)

  return wrapped


def _parameters(fn: Callable[..., Any]) -> set[str]:
  try:
    return set(inspect.signature(fn).parameters)
  except (TypeError, ValueError):  # no signature to read (some builtins)
    return set()


def _trace(fn, cache, leaves, treedef, dyn, stand_ins):
  dyn_set = set(dyn)
  statics = tuple(x for i, x in enumerate(leaves) if i not in dyn_set)
  try:
    cache_key = (treedef, statics, tuple(stand_ins))
    hash(cache_key)
  except TypeError:  # an unhashable static leaf: trace every call
    cache_key = None
  if cache_key is not None and cache_key in cache:
    cache.move_to_end(cache_key)
    return cache[cache_key]
  out_tree = []

  def flat_fn(*dyn_vals: Any) -> list[Any]:
    full = list(leaves)
    for i, v in zip(dyn, dyn_vals, strict=True):
      full[i] = v
    a, kw = jax.tree_util.tree_unflatten(treedef, full)
    flat_out, tree = jax.tree_util.tree_flatten(fn(*a, **kw))
    out_tree.append(tree)
    return flat_out

  try:
    closed = jax.make_jaxpr(flat_fn)(*stand_ins)
  except Exception as e:
    shapes = {str(i): s.shape for i, s in zip(dyn, stand_ins, strict=True) if is_lora(leaves[i])}
    e.add_note(
      f"lorax_fn.lora traced fn with LoRA leaves standing in for base weights of "
      f"shapes {sorted(shapes.values())}; check that they match the model."
    )
    raise
  result = (closed, out_tree[0])
  # Consts that are tracers belong to an enclosing trace (fn closes over a traced value):
  # such a jaxpr is valid inside that trace only.
  if cache_key is not None and not any(_jaxpr.is_tracer(c) for c in closed.consts):
    cache[cache_key] = result
    if len(cache) > _CACHE_SIZE:
      cache.popitem(last=False)
  return result
