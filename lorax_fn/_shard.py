"""Sharding wrapped pytrees over a device mesh: partition specs derived from the base's.

Every base leaf gets a :class:`~jax.sharding.PartitionSpec` from a rule (the default FSDP rule,
regex rules or a pytree of specs for the base); LoRA factors and quantised leaves inherit
theirs from it:

* ``a`` (``stack + (r,) + in``) takes the base's entries for its stack and input axes, ``b``
  (``stack + (r,) + out``) those for its stack and output axes; the rank axis is replicated.
* A quantised leaf stores its codes and block scales flattened in row-major blocks, so they
  are split along that block axis over the mesh axes the base's spec uses: exactly the base's
  row split when the spec shards axis 0. The double-quantisation scales follow when they
  divide evenly (they are tiny otherwise replicated), the offset is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax_fn import _paths
from lorax_fn._leaves import data_fields, factor_axes, is_adapter, is_stack
from lorax_fn._mesh import _check_mesh
from lorax_fn._quant import is_quant
from lorax_fn._quant_leaf import QuantLeaf

P = PartitionSpec


class ShardingWarning(UserWarning):
  """A leaf the default rule would split stays replicated (no axis divides evenly)."""


def _show_spec(spec: PartitionSpec) -> str:
  """``P('fsdp', None)`` on every JAX version (before 0.9.1 its repr was ``PartitionSpec(...)``)."""
  return "P" + repr(tuple(spec))


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _fsdp_spec(
  path: str, shape: tuple[int, ...], mesh: Mesh, min_size: int, leftovers: list[str]
) -> PartitionSpec:
  """The default rule: the largest divisible axis over ``fsdp``, the next over ``model``."""
  spec: list[Any] = [None] * len(shape)
  if not shape or math.prod(shape) < min_size:
    return P(*spec)
  for axis in ("fsdp", "model"):
    n = mesh.shape.get(axis, 1)
    if n == 1:
      continue
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n == 0]
    if not free:
      leftovers.append(f"{path} {shape} (no axis divisible by {axis}={n})")
      continue
    spec[max(free, key=lambda i: (shape[i], -i))] = axis
  return P(*spec)


def _compile_rule(pattern: str | re.Pattern) -> re.Pattern:
  if isinstance(pattern, re.Pattern):
    return pattern
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"sharding rule {pattern!r} is not a valid regular expression: {e}") from e


def _check_spec(path: str, spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(
      f"the partition spec for {path!r} has {len(spec)} entries; the leaf has shape {shape}"
    )
  used = [a for entry in spec for a in _mesh_axes(entry)]
  if len(set(used)) != len(used):
    raise ValueError(
      f"the partition spec {_show_spec(spec)} for {path!r} uses a mesh axis more than once"
    )
  for dim, entry in zip(shape[: len(spec)], spec, strict=True):
    names = _mesh_axes(entry)
    for name in names:
      if name not in mesh.shape:
        raise ValueError(
          f"the partition spec {_show_spec(spec)} for {path!r} uses mesh axis {name!r}; the "
          f"mesh has axes {tuple(mesh.axis_names)}"
        )
    n = math.prod(mesh.shape[a] for a in names)
    if dim % n:
      raise ValueError(
        f"the partition spec {_show_spec(spec)} for {path!r} splits an axis of size {dim} over "
        f"{'*'.join(names)}={n}, which does not divide it (shape {shape})"
      )


def _shape(x: Any) -> tuple[int, ...]:
  """The base's shape; for the trainable half of ``split`` (no ``w``), read off ``a`` and ``b``."""
  if is_adapter(x) and x.w is None:
    lead = 1 if is_stack(x) else 0  # a stack's adapter axis
    shape = [0] * len(x.roles)
    for f, axes in zip((x.a, x.b), factor_axes(x.roles), strict=True):
      for i, n in zip(axes, np.shape(f)[lead:], strict=True):
        if i is not None:
          shape[i] = n
    return tuple(shape)
  return tuple(x.shape) if is_quant(x) or is_adapter(x) else tuple(np.shape(x))


def _lora_specs(leaf: Any, spec: PartitionSpec) -> Any:
  """Specs for ``w``, ``a``, ``b`` and DoRA's ``m`` (``None`` where the field is empty).

  A stack's factors have a leading adapter axis (replicated), its scales, ranks and strengths too.
  """
  entries = tuple(spec) + (None,) * (len(leaf.roles) - len(spec))
  a_axes, b_axes = factor_axes(leaf.roles)
  lead = (None,) if is_stack(leaf) else ()
  a = P(*lead, *(None if i is None else entries[i] for i in a_axes))
  b = P(*lead, *(None if i is None else entries[i] for i in b_axes))
  m = P(*(e for e, r in zip(entries, leaf.roles, strict=True) if r != "in"))  # DoRA's
  e = P(*a[: len(a) - leaf.roles.count("in")])  # AdaLoRA's: stack + (rank,)
  fields = {"w": spec, "a": a, "b": b, "m": m, "e": e}
  fields.update(scales=P(), ranks=P(), strengths=P())
  return dataclasses.replace(
    leaf, **{f: None if getattr(leaf, f) is None else fields[f] for f in data_fields(leaf)}
  )


def _quant_specs(
  path: str, leaf: QuantLeaf, spec: PartitionSpec, mesh: Mesh, strict: bool, leftovers: list
) -> QuantLeaf:
  """Codes and block scales split along the block axis over the mesh axes ``spec`` uses."""
  names = tuple(a for entry in spec for a in _mesh_axes(entry))
  n = math.prod(mesh.shape[a] for a in names)
  split = P(names if len(names) > 1 else names[0]) if names else P()
  blocks = -(-leaf.size // leaf.block_size)
  whole = leaf.size % (n * leaf.block_size) == 0 and leaf.codes.shape[0] % n == 0
  if n > 1 and not whole:
    msg = (
      f"the quantised leaf {path!r} (shape {leaf.shape}, {blocks} blocks of "
      f"{leaf.block_size}) cannot be split over {'*'.join(names)}={n} on whole blocks"
    )
    if strict:
      raise ValueError(msg)
    leftovers.append(f"{path} {leaf.shape} (blocks not divisible by {n})")
    split = P()
  rep = P()

  def by_blocks(x: Any, count: int) -> Any:
    if x is None:
      return None
    return split if count % max(n, 1) == 0 and split != P() else rep

  scale_blocks = -(-blocks // 256)
  return dataclasses.replace(
    leaf,
    codes=split,
    absmax=by_blocks(leaf.absmax, blocks),
    absmax_codes=by_blocks(leaf.absmax_codes, blocks),
    absmax_scale=by_blocks(leaf.absmax_scale, scale_blocks),
    offset=None if leaf.offset is None else rep,
  )


def _is_rule(r: Any) -> bool:
  return isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], (str, re.Pattern))


def _is_rules(rules: Any) -> bool:
  if _is_rule(rules) and (_is_spec(rules[1]) or rules[1] == "fsdp"):
    raise TypeError(
      f"rules must be a list of (regex, spec) pairs; got the single pair {rules!r}: put it "
      "in a list"
    )
  return isinstance(rules, (list, tuple)) and bool(rules) and all(_is_rule(r) for r in rules)


def partition_specs(
  params: Any, rules: Any = "fsdp", *, mesh: Mesh, min_size: int = 1 << 14
) -> Any:
  """``PartitionSpec`` s for every leaf of a (wrapped, quantised) pytree.

  Args:
    params: a pytree, possibly holding :class:`LoraLeaf` and :class:`QuantLeaf` nodes.
    rules: how base leaves are sharded (LoRA factors and quantised leaves follow their base):

      * ``"fsdp"`` (default): each leaf of at least ``min_size`` elements has its largest
        axis divisible by the mesh's ``fsdp`` size split over ``fsdp`` and, when the mesh has
        a ``model`` axis, its largest remaining divisible axis over ``model`` (tensor
        parallelism). Leaves with no divisible axis stay replicated, with a warning.
      * ``"replicate"``: every leaf on every device.
      * ``[(regex, spec), ...]``: the first regex that fully matches the leaf's path (as in
        ``targets``: ``params/encoder/query/kernel``) gives its spec, a ``PartitionSpec`` over
        the base's axes, ``"fsdp"`` or ``None`` (replicated); unmatched leaves are
        replicated. A rule that matches no leaf is an error.
      * a pytree of ``PartitionSpec`` (or ``None``) with the structure of the base
        (``lora_fn.unwrap(params)``), e.g. from ``flax.linen.get_partition_spec``.
    mesh: the mesh the specs refer to.
    min_size: smallest leaf the ``"fsdp"`` rule splits.

  Returns:
    A pytree with the structure of ``params`` whose array leaves are ``PartitionSpec`` s
    (``LoraLeaf`` / ``QuantLeaf`` nodes hold a spec per field).

  Raises:
    ValueError: a spec that names an axis the mesh lacks, splits an axis its mesh axes do not
      divide, or has more entries than the leaf has axes (naming the leaf); a rule that
      matches nothing; a spec tree of another structure; an unknown rule string.
    TypeError: a rule whose spec is not a ``PartitionSpec``, ``"fsdp"`` or ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = lora_fn.make_mesh("fsdp=1,model=1", devices=jax.devices()[:1])
    >>> params = {"w": jnp.ones((256, 128)), "bias": jnp.zeros(128)}
    >>> params = lora_fn.wrap(params, rank=4, targets=("w",), key=jax.random.key(0))
    >>> specs = lora_fn.partition_specs(params, [("w", P("fsdp", "model"))], mesh=mesh)
    >>> [tuple(s) for s in (specs["w"].w, specs["w"].a, specs["w"].b, specs["bias"])]
    [('fsdp', 'model'), (None, 'fsdp'), (None, 'model'), ()]
  """
  _check_mesh(mesh)
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
    raise ValueError(f"min_size must be a non-negative int; got: {min_size!r}")
  is_node = lambda x: is_adapter(x) or is_quant(x)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  paths = [_paths.path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  shapes = [_shape(x) for x in leaves]
  leftovers: list[str] = []
  strict = [True] * len(leaves)
  if isinstance(rules, str):
    if rules not in ("fsdp", "replicate"):
      raise ValueError(
        f"rules must be 'fsdp', 'replicate', a rule list or a spec tree; got: {rules!r}"
      )
    base = [
      _fsdp_spec(p, s, mesh, min_size, leftovers) if rules == "fsdp" else P()
      for p, s in zip(paths, shapes, strict=True)
    ]
    strict = [False] * len(leaves)
  elif _is_rules(rules):
    base, used = [], [False] * len(rules)
    regexes = [_compile_rule(pattern) for pattern, _ in rules]
    for p, s in zip(paths, shapes, strict=True):
      j = next((j for j, regex in enumerate(regexes) if regex.fullmatch(p)), None)
      spec = None if j is None else rules[j][1]
      if j is not None:
        used[j] = True
      if spec == "fsdp":
        base.append(_fsdp_spec(p, s, mesh, min_size, leftovers))
        strict[len(base) - 1] = False
      elif spec is None or isinstance(spec, PartitionSpec):
        base.append(P() if spec is None else spec)
      else:
        raise TypeError(
          f"the spec of rule {rules[j][0]!r} must be a PartitionSpec, 'fsdp' or None; got: {spec!r}"
        )
    unused = [rules[j][0] for j, u in enumerate(used) if not u]
    if unused:
      raise ValueError(f"sharding rules {unused} matched no parameter; paths look like {paths[:3]}")
  else:
    spec_flat = jax.tree_util.tree_flatten_with_path(rules, is_leaf=_is_spec)[0]
    spec_paths = [_paths.path_str(q) for q, _ in spec_flat]
    spec_leaves = [s for _, s in spec_flat]
    if spec_paths != paths or any(not _is_spec(s) for s in spec_leaves):
      extra = sorted(set(spec_paths) - set(paths))[:3]
      missing = sorted(set(paths) - set(spec_paths))[:3]
      raise ValueError(
        "rules must be 'fsdp', 'replicate', a list of (regex, spec) or a pytree of "
        "PartitionSpec with the structure of the base (lora_fn.unwrap(params)); the spec "
        f"tree has {len(spec_paths)} leaves, the base {len(paths)}; not in the base: {extra}, "
        f"missing: {missing}"
      )
    base = [P() if s is None else s for s in spec_leaves]
  out = []
  for p, leaf, shape, spec, exact in zip(paths, leaves, shapes, base, strict, strict=True):
    _check_spec(p, spec, shape, mesh)
    if leaf is None:
      out.append(None)
    elif is_adapter(leaf) and is_quant(leaf.w):
      out.append(
        dataclasses.replace(
          _lora_specs(leaf, spec), w=_quant_specs(p, leaf.w, spec, mesh, exact, leftovers)
        )
      )
    elif is_adapter(leaf):
      out.append(_lora_specs(leaf, spec))
    elif is_quant(leaf):
      out.append(_quant_specs(p, leaf, spec, mesh, exact, leftovers))
    else:
      out.append(spec)
  if leftovers:
    warnings.warn(
      "these leaves stay replicated: " + "; ".join(leftovers), ShardingWarning, stacklevel=2
    )
  return jax.tree.unflatten(treedef, out)


def shardings(params: Any, mesh: Mesh, rules: Any = "fsdp", **kwargs: Any) -> Any:
  """``NamedSharding`` s for ``params``: :func:`partition_specs` on ``mesh``."""
  specs = partition_specs(params, rules, mesh=mesh, **kwargs)
  return jax.tree.map(
    lambda s: None if s is None else NamedSharding(mesh, s), specs, is_leaf=_is_spec
  )


def shard(params: Any, mesh: Mesh, rules: Any = "fsdp", **kwargs: Any) -> Any:
  """Places ``params`` on ``mesh`` as :func:`partition_specs` says.

  Host values (numpy or single-device arrays) become global arrays, each device receiving only
  its shard; in a multi-process run every process passes the same values. Arrays already
  spread over the mesh are resharded.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> mesh = lora_fn.make_mesh("data=-1")
    >>> params = {"w": jnp.ones((256, 128))}
    >>> params = lora_fn.wrap(params, rank=4, targets=("w",), key=jax.random.key(0))
    >>> placed = lora_fn.shard(params, mesh)
    >>> placed["w"].a.sharding.mesh == mesh
    True
  """
  return place(params, shardings(params, mesh, rules, **kwargs))


def state_shardings(state: Any, params: Any) -> Any:
  """Shardings for an optimiser state of ``params`` (placed arrays): leaves follow their param.

  Each state leaf whose key path ends with a param's key path and has its shape (Adam's
  ``mu`` and ``nu``, momentum, ...) takes that param's sharding; the rest (step counts,
  scalars) are replicated on the params' mesh. ``state`` may be abstract
  (``jax.eval_shape(tx.init, params)``), so the state can be created sharded by ``jax.jit``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lorax_fn as lora_fn
    >>> mesh = lora_fn.make_mesh("fsdp=-1")
    >>> params = lora_fn.shard({"w": jnp.ones((256, 128))}, mesh, min_size=1)
    >>> tx = optax.adam(1e-3)
    >>> out = lora_fn.state_shardings(jax.eval_shape(tx.init, params), params)
    >>> opt_state = jax.jit(tx.init, out_shardings=out)(params)
    >>> opt_state[0].mu["w"].sharding == params["w"].sharding
    True
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if not flat:
    raise ValueError("params has no arrays to take shardings from")
  mesh = next(
    (x.sharding.mesh for _, x in flat if isinstance(getattr(x, "sharding", None), NamedSharding)),
    None,
  )
  if mesh is None:
    raise ValueError("params must be placed on a mesh first (lora_fn.shard)")
  by_path = {tuple(p): x for p, x in flat}
  replicated = NamedSharding(mesh, P())

  def one(path: Any, x: Any) -> NamedSharding:
    path = tuple(path)
    for i in range(len(path)):
      param = by_path.get(path[i:])
      if param is not None and tuple(param.shape) == tuple(x.shape):
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, state)


def place(tree: Any, shardings: Any) -> Any:
  """Each array of ``tree`` as a global array with the matching sharding of ``shardings``."""

  def one(x: Any, s: NamedSharding) -> Any:
    if x is None:
      return None
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
      return jax.device_put(x, s)  # device to device (a reshard for a global array)
    host = np.asarray(x)  # host values (the same on every process) go shard by shard
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)
