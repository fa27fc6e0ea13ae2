"""``split`` / ``combine``: the trainable part of a wrapped pytree and the frozen rest."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

from lorax_fn import _paths, _validate
from lorax_fn._leaves import data_fields, is_adapter, static_fields, trainable_fields

_BIAS_MODES = ("none", "all", "lora_only")


def trainable_mask(
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  allow_empty: bool = False,
) -> Any:
  """A pytree of bools, one per array leaf: ``True`` where the leaf is trained.

  LoRA factors ``a`` and ``b`` (and DoRA's magnitude ``m``) are always trainable and the
  base ``w`` never is. Other leaves are frozen unless ``trainable`` selects them (like
  PEFT's ``modules_to_save``: names select every leaf under a matching path component,
  e.g. ``("head",)``) or ``bias`` says so: ``"all"`` trains every leaf named ``bias``,
  ``"lora_only"`` the biases beside a LoRA kernel.

  ``trainable`` may also be a regex (it selects every leaf whose path it finds) or a
  predicate ``(path, leaf) -> bool``.

  Raises:
    ValueError: if ``bias`` is unknown, a name in ``trainable`` (or the regex) matches
      nothing, or (unless ``allow_empty``) nothing at all is trainable, e.g. an unwrapped
      tree was passed.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7)), "bias": jnp.zeros(7)}, rank=2,
    ...                  targets=("k",), key=jax.random.key(0))
    >>> mask = lora_fn.trainable_mask(p, bias="all")
    >>> mask["bias"], (mask["k"].w, mask["k"].a, mask["k"].b)
    (True, (False, True, True))
  """
  if bias not in _BIAS_MODES:
    raise ValueError(f"bias must be one of {_BIAS_MODES}; got: {bias!r}")
  allow_empty = _validate.boolean("allow_empty", allow_empty)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)
  paths = [_paths.path_str(p) for p, _ in flat]
  lora_modules = {
    p.rsplit("/", 1)[0] for p, (_, x) in zip(paths, flat, strict=True) if is_adapter(x)
  }
  match = _extra_matcher(trainable)
  marks, hit_paths = [], []
  for path, (_, x) in zip(paths, flat, strict=True):
    if is_adapter(x):  # A, B (and DoRA's m) train; the base (a stack's scales...) never
      marks.append(dataclasses.replace(x, **trainable_fields(x)))
      continue
    name, module = path.rsplit("/", 1)[-1], path.rsplit("/", 1)[0] if "/" in path else ""
    hit = match is not None and bool(match(path, x))
    if hit:
      hit_paths.append(path)
    on = name == "bias" and (bias == "all" or (bias == "lora_only" and module in lora_modules))
    marks.append(hit or on)
  if match is not None:
    _check_every_name(trainable, hit_paths, paths, lora_modules)
  if not allow_empty and not lora_modules and not any(marks):
    raise ValueError(
      "params hold no LoRA leaf and no trainable leaf, so nothing would be trained; pass the "
      "tree returned by lorax_fn.wrap (or name leaves with trainable=)."
    )
  return jax.tree_util.tree_unflatten(treedef, marks)


def _extra_matcher(trainable: Any) -> Any:
  """Names select every leaf under a path component they name; a regex every leaf it finds."""
  if trainable is None:
    return None
  if isinstance(trainable, (list, tuple)) and all(isinstance(t, str) for t in trainable):
    if not trainable:
      raise ValueError(f"trainable must not be empty (None: no extra leaf); got: {trainable!r}")
    names = frozenset(trainable)
    return lambda path, leaf: any(p in names for p in path.split("/"))
  if isinstance(trainable, (str, re.Pattern)):
    if trainable in ("", re.compile("")):
      raise ValueError("trainable must not be an empty regex (it would match every path)")
    try:
      regex = re.compile(trainable)
    except re.error as e:
      raise ValueError(f"trainable {trainable!r} is not a valid regular expression: {e}") from e
    return lambda path, leaf: regex.search(path) is not None
  return _paths.make_matcher(trainable, what="trainable")


def _check_every_name(trainable: Any, hits: list[str], paths: list[str], lora: set[str]) -> None:
  """Every name (or the one regex or predicate) must select a leaf that is not LoRA."""
  names = trainable if isinstance(trainable, (list, tuple)) else [trainable]
  for name in names:
    if isinstance(name, str) and isinstance(trainable, (list, tuple)):
      found = any(name in h.split("/") for h in hits)
    else:
      found = bool(hits)
    if found:
      continue
    hint = ""
    if isinstance(name, str) and "/" in name and isinstance(trainable, (list, tuple)):
      hint = f" (names match single path components: for the path pass the regex {name!r})"
    elif isinstance(name, str) and any(name in m.split("/") for m in lora):
      hint = " (it selects only LoRA kernels, whose factors are always trained)"
    raise ValueError(
      f"trainable {name!r} matched no parameter{hint}; nearest available paths: "
      f"{_near([name] if isinstance(name, str) else name, paths)}"
    )


def _near(trainable: Any, paths: list[str]) -> list[str]:
  names = trainable if isinstance(trainable, (list, tuple)) else [str(trainable)]
  out: list[str] = []
  for t in names:
    out += [p for p in _paths.nearest_paths(str(t), paths) if p not in out]
  return out[:8]


def _is_mask_leaf(x: Any) -> bool:
  return isinstance(x, bool) or is_adapter(x)


def split(
  params: Any, *, trainable: _paths.Targets | None = None, bias: str = "none"
) -> tuple[Any, Any]:
  """Splits ``params`` into ``(trainable, frozen)`` trees with ``None`` at the gaps.

  Take gradients with respect to the first only: frozen kernels then get no gradient at
  all (not even zeros), and integer leaves never meet ``jax.grad``. ``combine`` undoes it.

  Args:
    params: a pytree that may hold :class:`LoraLeaf` nodes.
    trainable: extra leaves to train, as in :func:`trainable_mask`.
    bias: ``"none"``, ``"all"`` or ``"lora_only"``, as in :func:`trainable_mask`.

  Returns:
    ``(trainable, frozen)``, each with ``params``' structure and ``None`` where the leaf
    belongs to the other.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7)), "bias": jnp.zeros(7)}, rank=2,
    ...                  targets=("k",), key=jax.random.key(0))
    >>> train, frozen = lora_fn.split(p)
    >>> train["k"].w is None, train["bias"] is None, frozen["k"].a is None
    (True, True, True)
    >>> lora_fn.combine(train, frozen)["k"].a.shape
    (2, 5)
  """
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  return partition(params, mask)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
  """Splits ``params`` by a :func:`trainable_mask` into ``(trainable, frozen)``."""

  def pick(keep: bool) -> Any:
    def one(m: Any, x: Any) -> Any:
      if is_adapter(m):
        return dataclasses.replace(
          x, **{f: getattr(x, f) if getattr(m, f) == keep else None for f in data_fields(m)}
        )
      return x if m == keep else None

    return jax.tree.map(one, mask, params, is_leaf=_is_mask_leaf)

  return pick(True), pick(False)


def combine(*trees: Any) -> Any:
  """Merges trees from :func:`split`: each leaf is the one tree's value that is not ``None``.

  Args:
    *trees: trees of one structure, e.g. ``(trainable, frozen)`` from :func:`split`.

  Returns:
    One tree with every gap filled.

  Raises:
    TypeError: if a tree is ``None`` or none is given.
    ValueError: if the trees differ in structure, two trees hold a value at one leaf, or
      their LoRA leaves differ in rank, alpha, layout or options (halves of different wraps).

  Example:
    >>> import lorax_fn as lora_fn
    >>> lora_fn.combine({"a": 1, "b": None}, {"a": None, "b": 2})
    {'a': 1, 'b': 2}
  """
  if not trees:
    raise TypeError("combine needs the trees to merge, e.g. combine(trainable, frozen)")
  for i, t in enumerate(trees):
    if t is None:
      raise TypeError(
        f"combine got None as tree {i}; pass both halves that lorax_fn.split returned: "
        "combine(trainable, frozen)"
      )
  is_leaf = lambda x: x is None or is_adapter(x)
  flat, treedef = jax.tree_util.tree_flatten_with_path(trees[0], is_leaf=is_leaf)
  columns = [[x] for _, x in flat]
  for i, t in enumerate(trees[1:], 1):
    other, other_def = jax.tree_util.tree_flatten_with_path(t, is_leaf=is_leaf)
    if other_def != treedef:
      raise ValueError(
        f"combine: tree {i} does not have the structure of tree 0 "
        f"({_first_difference(flat, other)}); combine the halves of one lorax_fn.split."
      )
    for col, (_, x) in zip(columns, other, strict=True):
      col.append(x)
  out = [_first(p, xs) for (p, _), xs in zip(flat, columns, strict=True)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _first_difference(a: list[Any], b: list[Any]) -> str:
  pa, pb = [_paths.path_str(p) for p, _ in a], [_paths.path_str(p) for p, _ in b]
  only_a, only_b = [p for p in pa if p not in set(pb)], [p for p in pb if p not in set(pa)]
  if only_a or only_b:
    return f"only in tree 0: {only_a[:5]}, only in the other: {only_b[:5]}"
  return "the same paths, with other node types"


def _first(keys: Any, xs: list[Any]) -> Any:
  """The merged leaf at tree path ``keys`` (formatted only for an error message)."""
  loras = [x for x in xs if is_adapter(x)]
  if not loras:
    return _only(keys, "", xs)
  if any(x is not None and type(x) is not type(loras[0]) for x in xs):
    raise ValueError(
      f"combine: at {_paths.path_str(keys)!r} one tree holds a LoRA leaf and another a plain "
      "array (or a stack); the trees come from different wraps (other targets)."
    )
  for field in static_fields(loras[0]):
    values = [getattr(x, field) for x in loras]
    if any(v != values[0] for v in values):
      raise ValueError(
        f"combine: the LoRA leaf at {_paths.path_str(keys)!r} has {field}={values[0]!r} in one "
        f"tree and {field}={next(v for v in values if v != values[0])!r} in another; combine "
        "the halves of one wrap."
      )
  fields = {f: _only(keys, f"/{f}", [getattr(x, f) for x in loras]) for f in data_fields(loras[0])}
  return dataclasses.replace(loras[0], **fields)


def _only(keys: Any, field: str, xs: list[Any]) -> Any:
  """The one value that is not ``None`` (or ``None``); two values are an error."""
  present = [x for x in xs if x is not None]
  if len(present) > 1:
    raise ValueError(
      f"combine: more than one tree holds a value at {_paths.path_str(keys) + field!r}; pass "
      "the two halves of one lorax_fn.split, whose leaves are disjoint."
    )
  return present[0] if present else None
