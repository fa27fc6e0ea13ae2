"""Parameter paths as ``"a/b/c"`` strings and target matching."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from lorax_fn import _validate

# A target is a sequence of names, one regular expression, or a predicate.
Targets = Sequence[str] | str | re.Pattern | Callable[[str, Any], bool]

# Leaf names that hold a weight matrix in Flax (linen and NNX) and in common plain-JAX trees.
KERNEL_NAMES = ("kernel", "embedding", "w", "weight")

# Attribute names under which Flax NNX ``Variable`` nodes keep their array.
_VARIABLE_ATTRS = ("value", "raw_value")


def _key_name(entry: Any) -> str:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_str(path: Sequence[Any]) -> str:
  """Returns a key path as ``"a/b/c"``, dropping NNX ``Variable`` wrappers."""
  names = [_key_name(e) for e in path]
  while (
    len(names) > 1
    and isinstance(path[len(names) - 1], jax.tree_util.GetAttrKey)
    and names[-1] in _VARIABLE_ATTRS
  ):
    names.pop()
  return "/".join(names)


def _module(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else path


def matches_pattern(pattern: str, path: str) -> bool:
  """True if ``pattern`` (a name or regex) matches ``path`` or a suffix of it.

  Like PEFT's ``rank_pattern`` keys: ``"query"`` matches ``"enc/0/query/kernel"``
  through its module path ``"enc/0/query"``; a full regex may match the whole path.
  """
  return _suffix_regex(pattern).fullmatch(path) is not None or (
    _suffix_regex(pattern).fullmatch(_module(path)) is not None
  )


@functools.lru_cache(maxsize=4096)
def _suffix_regex(pattern: str) -> re.Pattern:
  return re.compile(rf"(?:.*/)?(?:{pattern})")


# The collection of a Flax variables dict that holds the parameters: keys of a tree that
# holds ``params`` (from ``infer_layouts(model.apply, {"params": p}, x)``) start with it.
PARAMS_COLLECTION = "params"


@dataclasses.dataclass(frozen=True)
class Patterns:
  """Checked ``{key: value}`` patterns (``rank_pattern``, ``layouts``, ...).

  A key that is a path matches that path only; any other key is a regex matching a path or a
  suffix of it (as PEFT's ``rank_pattern``). An exact path wins, then the first regex in the
  order given.
  """

  exact: dict[str, Any] = dataclasses.field(default_factory=dict)
  regexes: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

  def lookup(self, path: str) -> Any:
    """The value for ``path``, or ``None``."""
    if path in self.exact:
      return self.exact[path]
    return next((v for key, v in self.regexes if matches_pattern(key, path)), None)

  def items(self) -> list[tuple[str, Any]]:
    return [*self.exact.items(), *self.regexes]

  def map(self, fn: Callable[[str, Any], Any]) -> Patterns:
    """The same keys with values ``fn(key, value)`` (e.g. checked and converted)."""
    return Patterns(
      {k: fn(k, v) for k, v in self.exact.items()}, [(k, fn(k, v)) for k, v in self.regexes]
    )


def check_patterns(
  what: str,
  patterns: Mapping[str, Any] | None,
  paths: Sequence[str],
  candidates: Sequence[str],
  among: str = "parameter",
) -> Patterns:
  """Validates ``{pattern: value}``: every key must match one of ``candidates``.

  A key that is a path of the tree, or of a Flax variables dict holding it as ``params``
  (``"params/dense/kernel"`` for a tree with ``"dense/kernel"``, as
  ``infer_layouts(model.apply, {"params": p}, x)`` returns), names that path exactly. Any
  other key must be a valid regex. ``candidates`` are the paths a key may apply to (the
  targets, for ``rank_pattern``; ``among`` names them in the message); ``paths`` are all.

  Raises:
    TypeError: if ``patterns`` is not a mapping with string keys.
    ValueError: if a key is not a valid regex or matches none of ``candidates``.
  """
  out = Patterns()
  if patterns is None:
    return out
  if not isinstance(patterns, Mapping) or not all(isinstance(k, str) for k in patterns):
    raise TypeError(
      f"{what} must be a mapping from path patterns (str) to values; got: {patterns!r}"
    )
  known, allowed = set(paths), set(candidates)
  prefix = PARAMS_COLLECTION + "/"
  for key, value in patterns.items():
    path = key if key in known else None
    if path is None and key.startswith(prefix) and key[len(prefix) :] in known:
      path = key[len(prefix) :]
    if path is not None:
      if path not in allowed:
        raise ValueError(
          f"{what} key {key!r} matches no {among}; nearest: {nearest_paths(key, list(candidates))}"
        )
      out.exact.setdefault(path, value)  # the first key for a path wins
      continue
    try:
      re.compile(key)
    except re.error as e:
      raise ValueError(f"{what} key {key!r} is not a valid regular expression: {e}") from e
    if not any(matches_pattern(key, p) for p in candidates):
      raise ValueError(
        f"{what} key {key!r} matches no {among}; nearest: {nearest_paths(key, list(candidates))}"
      )
    out.regexes.append((key, value))
  return out


def make_matcher(
  targets: Targets, kernel_names: Sequence[str] = KERNEL_NAMES, what: str = "targets"
) -> Callable[[str, Any], bool]:
  """Builds a ``(path, leaf) -> bool`` predicate from a target specification.

  Names match whole path components: a name selects a leaf if it equals the leaf's own
  name, or a component of its module path while the leaf's name is a kernel name
  (``kernel``, ``embedding``, ...). Biases and norm scales are never selected by name.
  A regex that matches the whole path selects that leaf whatever it is; one that matches
  only part of it (``"query|value"``) selects kernels only, as names do.
  """
  if callable(targets) and not isinstance(targets, re.Pattern):
    _validate.two_arg_callable(what, targets)
    return lambda path, leaf: bool(targets(path, leaf))
  if isinstance(targets, (str, re.Pattern)):
    if targets in ("", re.compile("")):
      raise ValueError(f"{what} must not be an empty regex (it would match every path)")
    try:
      regex = re.compile(targets) if isinstance(targets, str) else targets
    except re.error as e:
      raise ValueError(f"{what} {targets!r} is not a valid regular expression: {e}") from e

    def match_regex(path: str, leaf: Any) -> bool:
      del leaf
      if regex.fullmatch(path) is not None:  # a pattern for the whole path selects anything
        return True
      # A partial match ("query|value", as in PEFT) selects kernels only, never biases.
      return regex.search(path) is not None and path.rsplit("/", 1)[-1] in kernel_names

    return match_regex
  if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
    raise TypeError(
      f"{what} must be a sequence of names, a regex string or pattern, or a callable "
      f"(path, leaf) -> bool; got: {targets!r}"
    )
  if not targets:
    raise ValueError(f"{what} must not be empty; got: {targets!r}")
  names = frozenset(targets)
  return lambda path, leaf: any(name_matches(n, path, kernel_names) for n in names)


def name_matches(name: str, path: str, kernel_names: Sequence[str] = KERNEL_NAMES) -> bool:
  """A target name selects a leaf it names, or a kernel under a module it names."""
  parts = path.split("/")
  return parts[-1] == name or (parts[-1] in kernel_names and name in parts[:-1])


def select(
  targets: Targets,
  paths: Sequence[str],
  leaves: Sequence[Any],
  kernel_names: Sequence[str] = KERNEL_NAMES,
) -> list[int]:
  """Indices of the leaves ``targets`` selects; every name given must select something.

  Raises:
    ValueError: if nothing is selected, one of several names selects nothing (a typo
      beside a correct name), or a regex is invalid.
    TypeError: if ``targets`` has the wrong type.
  """
  match = make_matcher(targets, kernel_names)
  hits = [i for i, (p, x) in enumerate(zip(paths, leaves, strict=True)) if match(p, x)]
  kernels = [p for p, x in zip(paths, leaves, strict=True) if p.rsplit("/", 1)[-1] in kernel_names]
  kernels = kernels or [p for p, x in zip(paths, leaves, strict=True) if getattr(x, "ndim", 0) >= 2]
  if not hits:
    names = [targets] if isinstance(targets, str) else targets
    near: list[str] = []
    if isinstance(names, Sequence):
      for t in names:
        near += [p for p in nearest_paths(str(t), kernels) if p not in near]
    hint = name_hint(targets[0], paths, kernel_names) if _is_names(targets) else ""
    raise ValueError(
      f"targets {targets!r} matched no parameter{hint}; nearest available paths: "
      f"{near[:8] or list(kernels[:8])}"
    )
  if isinstance(targets, Sequence) and not isinstance(targets, str):
    for name in targets:
      if not any(name_matches(name, paths[i], kernel_names) for i in hits):
        raise ValueError(
          f"targets name {name!r} matched no parameter (every name must select at least one "
          f"kernel){name_hint(name, paths, kernel_names)}; nearest available paths: "
          f"{nearest_paths(name, kernels)}"
        )
  return hits


def name_hint(name: str, paths: Sequence[str], kernel_names: Sequence[str]) -> str:
  """Why a name selected nothing, when the reason is a common one."""
  if "/" in name:
    return (
      f"; names match single path components: for the path itself pass the regex string {name!r}"
    )
  leaves = {p.rsplit("/", 1)[-1] for p in paths if name in p.split("/")[:-1]}
  if leaves and not leaves & set(kernel_names):
    return (
      f"; the leaves under {name!r} are named {sorted(leaves)}, none of them in "
      f"kernel_names={tuple(kernel_names)}"
    )
  return ""


def _is_names(targets: Any) -> bool:
  return isinstance(targets, Sequence) and not isinstance(targets, str) and len(targets) == 1


def nearest_paths(target: str, paths: Sequence[str], n: int = 5) -> list[str]:
  """The available paths closest to ``target``, for error messages."""
  by_component: dict[str, str] = {}
  for p in paths:
    for comp in p.split("/"):
      by_component.setdefault(comp, p)
  near = difflib.get_close_matches(target, list(by_component), n=n, cutoff=0.5)
  out = list(dict.fromkeys(by_component[c] for c in near))
  out += [
    p for p in difflib.get_close_matches(target, list(paths), n=n, cutoff=0.3) if p not in out
  ]
  return out[:n] if out else list(paths[:n])
