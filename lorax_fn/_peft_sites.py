"""PEFT directories: names and sites shared by ``save_peft``, ``load_peft``, ``serving_problems``.

A site is an array of params and the PyTorch module(s) it belongs to: a LoRA kernel (one
module per stacked layer) or a leaf written whole (a trained module's weight, a bias).
``modules`` maps this library's module paths to PyTorch module names; how each array
converts follows from its kernel's axis roles (``_torch_layout``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lorax_fn import _paths, _torch_layout
from lorax_fn._leaves import is_adapter, is_lora, is_stack
from lorax_fn._partition import trainable_mask
from lorax_fn._quant import is_quant

Modules = Mapping[str, "str | Sequence[str]"] | Callable[[str], "str | Sequence[str] | None"]
"""Module path (``"params/encoder/layer_0/query"``) -> PyTorch module name(s), or a callable.

The first name is the one written; the others are also read (e.g. the transformers 4.x name
of a module transformers 5 renamed). ``{}`` in a name stands for the index along a stacked
(``nn.scan``) axis: such a kernel becomes one PyTorch module per layer.
"""

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Leaf names of this library's trees -> PyTorch parameter names.
_PARAM_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_KERNEL_NAMES = ("kernel", "embedding")
_MAGNITUDE = "lora_magnitude_vector"

# ------------------------------------------------------------------------------------------
# Sites: an array of params and the PyTorch module(s) it belongs to.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Site:
  path: str  # the leaf's path in params
  names: tuple[tuple[str, ...], ...]  # per layer (one if not stacked): (written, *also read)
  roles: tuple[str, ...] | None  # a kernel's axis roles, stack included; None for vectors
  kind: str  # Linear / Conv2d / Embedding for a kernel
  param: str  # the PyTorch parameter name ("weight", "bias", ...)
  stacked: bool  # axis 0 of the leaf is a layer axis: one module per index


def _raw_names(modules: Modules, module_path: str) -> tuple[str, ...]:
  """The names ``modules`` gives the module at ``module_path`` (``()`` if none)."""
  value = modules(module_path) if callable(modules) else modules.get(module_path)
  if value is None:
    return ()
  names = (value,) if isinstance(value, str) else tuple(value)
  if not names or not all(isinstance(n, str) and n for n in names):
    raise TypeError(
      f"modules[{module_path!r}] must be a module name or a sequence of them; got: {value!r}"
    )
  if len({"{}" in n for n in names}) > 1:
    raise ValueError(
      f"modules[{module_path!r}] = {value!r}: either every name has the '{{}}' layer "
      "placeholder or none has"
    )
  return names


def _per_layer(raw: tuple[str, ...], layers: int | None, where: str) -> tuple:
  stacked = "{}" in raw[0]
  if stacked and layers is None:
    raise ValueError(
      f"the module name {raw[0]!r} of {where!r} has a '{{}}' layer placeholder, but {where!r} "
      "has no stack axis"
    )
  if not stacked and layers is not None:
    raise ValueError(
      f"{where!r} stacks {layers} layers (an nn.scan axis); its module name {raw[0]!r} needs a "
      "'{}' placeholder for the layer index"
    )
  if stacked:
    return tuple(tuple(n.format(i) for n in raw) for i in range(layers))
  return (raw,)


def _kernel_site(path: str, raw: tuple[str, ...], shape: tuple, roles: tuple) -> _Site:
  stacks = [i for i, r in enumerate(roles) if r == "stack"]
  if len(stacks) > 1 or stacks[:1] not in ([], [0]):
    raise ValueError(
      f"the kernel at {path!r} has stack axes at {stacks}; PEFT export supports one, first"
    )
  inner = tuple(r for r in roles if r != "stack")
  kind = _torch_layout.kind(path.rsplit("/", 1)[-1], inner)
  names = _per_layer(raw, shape[0] if stacks else None, path)
  return _Site(path, names, roles, kind, "weight", bool(stacks))


def _param_site(
  path: str, raw: tuple[str, ...], leaf: Any, layout: Any = None, in_lora_module: bool = False
) -> _Site:
  """A leaf written whole (a trained module's weight, a bias), per layer if the name says.

  ``layout`` is the kernel's (``layouts=``), else :func:`default_layout`'s. The bias of a
  module PEFT wraps with LoRA is its ``base_layer.bias``.
  """
  from lorax_fn._wrap import default_layout  # (an import cycle at module level)

  name = path.rsplit("/", 1)[-1]
  shape = tuple(np.shape(leaf))
  stacked = "{}" in raw[0]
  inner = shape[1:] if stacked else shape
  roles, kind = None, ""
  if name in _KERNEL_NAMES and len(inner) >= 2:
    given = tuple(layout) if layout is not None else None
    if given is not None and given[:1] == ("stack",):
      given = given[1:]
    inner_roles = given or tuple(default_layout(path, inner))
    roles = (("stack",) if stacked else ()) + inner_roles
    kind = _torch_layout.kind(name, inner_roles)
  names = _per_layer(raw, shape[0] if stacked else None, path)
  param = _PARAM_NAMES.get(name, name)
  if in_lora_module:
    param = "base_layer." + param
  return _Site(path, names, roles, kind, param, stacked)


def _flat(params: Any) -> list[tuple[str, Any]]:
  flat = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: is_adapter(x) or is_quant(x)
  )
  stacks = [_paths.path_str(p) for p, x in flat[0] if is_stack(x)]
  if stacks:
    raise ValueError(
      f"{stacks[0]!r} holds stacked adapters; PEFT files hold one adapter: "
      "unstack_adapter(params, slot) first"
    )
  return [(_paths.path_str(p), x) for p, x in flat[0]]


def _trained_leaves(params: Any, trainable: Any, bias: str) -> list[tuple[str, Any, bool, bool]]:
  """``(path, leaf, trained, chosen)`` for each leaf of ``params``, LoRA leaves whole.

  ``trained``: a LoRA leaf, or a leaf that ``trainable`` or ``bias`` trains; ``chosen``: a leaf
  other than a LoRA leaf that ``trainable`` itself selects (a whole module, not a bias).
  """
  is_mark = lambda x: isinstance(x, bool) or is_lora(x)
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  chosen = trainable_mask(params, trainable=trainable, allow_empty=True)  # not bias=
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
  return [
    (_paths.path_str(keys), leaf, is_lora(leaf) or bool(mark), not is_lora(leaf) and bool(pick))
    for (keys, leaf), mark, pick in zip(
      flat,
      jax.tree.leaves(mask, is_leaf=is_mark),
      jax.tree.leaves(chosen, is_leaf=is_mark),
      strict=True,
    )
  ]


def _check_modules(modules: Any) -> None:
  if not callable(modules) and not isinstance(modules, Mapping):
    raise TypeError(f"modules must be a mapping or a callable; got: {modules!r}")


def _check_keys(modules: Modules, paths: list[str]) -> None:
  """Every key of a ``modules`` mapping must be a module path of ``params``."""
  if callable(modules):
    return
  known = {p.rpartition("/")[0] for p in paths}
  for key in modules:
    if key not in known:
      raise ValueError(
        f"modules key {key!r} is not a module path of params; nearest: "
        f"{_paths.nearest_paths(key, sorted(known))} (a 'params/' prefix, or a scanned vs "
        "unrolled model?)"
      )


def _check_distinct(sites: list[_Site], suffix: Callable[[_Site], str]) -> None:
  """Two of our paths must never be written to one PyTorch name."""
  seen: dict[str, str] = {}
  for site in sites:
    for names in site.names:
      key = names[0] + suffix(site)
      if seen.setdefault(key, site.path) != site.path:
        raise ValueError(
          f"modules maps both {seen[key]!r} and {site.path!r} to the PyTorch "
          f"{'module' if not suffix(site) else 'parameter'} {key!r}"
        )


def _host(x: Any) -> np.ndarray:
  from lorax_fn._checkpoint import _host as gather

  a = gather(x)
  return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _layer(x: np.ndarray, site: _Site, i: int) -> np.ndarray:
  return x[i] if site.stacked else x


def _magnitude_shape(site: _Site, n_out: int) -> tuple[int, ...]:
  """PEFT's shape of one layer's DoRA magnitude: ``(out,)``, a ``Conv2d``'s ``(1, out, 1, 1)``."""
  return (1, n_out, 1, 1) if site.kind == _torch_layout.CONV2D else (n_out,)
