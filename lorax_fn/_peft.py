"""``save_peft`` / ``load_peft``: adapters as PEFT directories, for PyTorch, the hub and vLLM.

A PEFT LoRA directory is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)`` (an ``Embedding``: ``lora_embedding_A`` ``(r, num)``, ``lora_embedding_B``
``(dim, r)``), DoRA's ``...lora_magnitude_vector`` (``(out,)``; a ``Conv2d``'s
``(1, out, 1, 1)``), and ``base_model.model.<module>.<param>`` for fully trained modules
(``modules_to_save``) and trained biases. ``modules`` maps this library's module paths to
PyTorch module names; how each array converts follows from its kernel's axis roles
(``_torch_layout``), so no model needs a converter of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _adalora, _init, _paths, _torch_layout
from lorax_fn._leaves import (
  LoraLeaf,
  factor_shapes,
  is_adapter,
  is_lora,
  is_stack,
  magnitude_shape,
)
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
# vLLM's choices for --max-lora-rank.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFT options that change what an adapter computes, with the value that does not.
_UNSUPPORTED = {
  "lora_bias": False,
  "layers_to_transform": None,
  "layer_replication": None,
  "trainable_token_indices": None,
  "target_parameters": None,
  "use_qalora": False,
  "alora_invocation_tokens": None,
  "use_bdlora": None,
}
_PLAIN_INITS = (True, False, "gaussian")
_FACTOR_KEY = re.compile(
  r"(?P<m>.+)\.(?P<f>lora_A|lora_B)\.weight|(?P<e>.+)\.(?P<g>lora_embedding_A|lora_embedding_B)"
  r"|(?P<d>.+)\.lora_magnitude_vector(?:\.weight)?"
)
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


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _host(x: Any) -> np.ndarray:
  from lorax_fn._checkpoint import _host as gather

  a = gather(x)
  return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def _layer(x: np.ndarray, site: _Site, i: int) -> np.ndarray:
  return x[i] if site.stacked else x


def _to_torch(x: np.ndarray, site: _Site) -> np.ndarray:
  """A whole leaf (one layer of it) in the PyTorch parameter's layout."""
  if site.kind:
    inner = tuple(r for r in site.roles if r != "stack")
    return _torch_layout.kernel_to_torch(x, inner, site.kind)
  return x.reshape(-1) if site.param == "bias" else x


def _pattern_keys(groups: Mapping[Any, list[str]], default: Any) -> dict[str, Any]:
  """PEFT's ``rank_pattern`` / ``alpha_pattern``: keys for the modules not at the default.

  A module's last name (``fc1``) is the key when every adapted module of that name has the
  same value; otherwise its full name, escaped (PEFT matches keys as regexes ending a name).
  """
  value_of = {n: v for v, names in groups.items() for n in names}
  out: dict[str, Any] = {}
  for value, names in groups.items():
    if value == default:
      continue
    for name in names:
      short = name.rsplit(".", 1)[-1]
      if all(v == value for n, v in value_of.items() if n.rsplit(".", 1)[-1] == short):
        out[short] = value
      else:
        out[re.escape(name)] = value
  return out


def _target_modules(names: list[str]) -> list[str]:
  """The adapted modules' full names: a last name (``fc1``) would also make PEFT adapt any
  other module of that name, which ``modules`` may not list."""
  return sorted(set(names))


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def save_peft(
  path: str | os.PathLike,
  params: Any,
  *,
  modules: Modules,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  base_model_name_or_path: str | None = None,
  task_type: str | None = None,
  strict_serving: bool = False,
  max_lora_rank: int = 16,
  heads: Sequence[str] = ("lm_head",),
  layouts: Mapping[str, Sequence[str]] | None = None,
  initial: Any = None,
  adalora: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> None:
  """Writes the adapters (and fully trained modules) as a PEFT LoRA directory.

  ``peft.PeftModel.from_pretrained(model, path)`` loads it onto the matching PyTorch model,
  and vLLM serves it when :func:`serving_problems` finds nothing. Ranks and alphas that
  differ between kernels become ``rank_pattern`` / ``alpha_pattern``; a scan-stacked kernel
  becomes one module per layer; leaves ``trainable`` selects (e.g. a classifier head) are
  PEFT's ``modules_to_save``, stored under the plain module name. Factors are written in
  float32 (16-bit factors are widened).

  Args:
    path: the directory to write; written beside it and renamed, so never half-written.
    params: the wrapped parameters.
    modules: our module paths to PyTorch module names (see :data:`Modules`).
    trainable: fully trained extra leaves, as for :func:`lorax_fn.optimizer`.
    bias: ``"none"``, ``"all"`` or ``"lora_only"``: PEFT's bias mode (trained biases saved).
    base_model_name_or_path: recorded in the config (e.g. the hub id of the base).
    task_type: PEFT's task type, e.g. ``"CAUSAL_LM"`` (``None`` for other models).
    strict_serving: raise instead of writing if vLLM would refuse the adapter.
    max_lora_rank: the vLLM server's ``--max-lora-rank``, for ``strict_serving``.
    heads: module names that count as an output head, for ``strict_serving``.
    layouts: layouts of fully trained kernels whose default layout is ambiguous (a 3-D
      ``DenseGeneral``), as for :func:`wrap`.
    initial: for adapters whose init changed the base (``init="pissa"``, ``"olora"``): the
      LoRA leaves as :func:`wrap` made them, before training (the tree it returned, or its
      trainable half from :func:`split`). The adapter is then written as PEFT's
      ``path_initial_model_for_weight_conversion`` writes it: a plain LoRA of rank ``2r``,
      ``[A; A₀]`` and ``[B, -B₀]`` (alpha doubled, ``√2×`` with rsLoRA, so the scale stays),
      to load onto the ORIGINAL base, which vLLM serves. Without it the adapter is
      relative to the base in ``params`` (for PiSSA / OLoRA the residual that
      :func:`unwrap` returns).
    adalora: for AdaLoRA leaves (written as PEFT's ``peft_type "ADALORA"``, the triplets
      pruned to ``e = 0`` left out and named in ``rank_pattern``): the keyword arguments
      given to :func:`lorax_fn.adalora`, recorded as PEFT records its schedule (without
      them a placeholder schedule: PEFT needs one to load, inference ignores it).
    overwrite: replace an existing directory.

  Raises:
    ValueError: an unmapped module, two paths mapped to one name, an existing ``path``,
      options one PEFT config cannot hold (mixed rsLoRA or dropout), or (``strict_serving``)
      what vLLM refuses.

  Example:
    >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": {"kernel": jnp.ones((5, 7))}}, rank=2, targets=("fc",),
    ...                  key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/peft"
    >>> lora_fn.save_peft(d, p, modules={"fc": "model.fc"})
    >>> json.loads(pathlib.Path(d, "adapter_config.json").read_text())["target_modules"]
    ['model.fc']
  """
  if bias not in ("none", "all", "lora_only"):
    raise ValueError(f"bias must be one of ('none', 'all', 'lora_only'); got: {bias!r}")
  _check_modules(modules)
  loras, extras, modules_to_save = _save_sites(params, modules, trainable, bias, layouts)
  if strict_serving:
    problems = serving_problems(
      params, trainable=trainable, bias=bias, max_lora_rank=max_lora_rank, heads=heads
    )
    if problems:
      raise ValueError("vLLM would refuse this adapter: " + "; ".join(problems))
  leaves = dict(_flat(params))
  if initial is not None:
    initial = _init.initial_factors(initial, {s.path: leaves[s.path] for s in loras})
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas = collections.defaultdict(list), collections.defaultdict(list)
  options = collections.defaultdict(set)
  for site in loras:
    leaf = leaves[site.path]
    a, b = _host(leaf.a), _host(leaf.b)
    rank, alpha = leaf.rank, leaf.alpha
    if initial is not None:
      first = initial[site.path]
      a, b, rank, alpha = _init.convert_to_plain(leaf, a, b, _host(first.a), _host(first.b))
    m = None if leaf.m is None else _host(leaf.m)
    a_name, b_name = _torch_layout.factor_names(site.kind)
    for i, names in enumerate(site.names):
      ta, tb = _torch_layout.factors_to_torch(_layer(a, site, i), _layer(b, site, i), site.kind)
      tensors[f"{PREFIX}{names[0]}.{a_name}"] = np.ascontiguousarray(ta)
      tensors[f"{PREFIX}{names[0]}.{b_name}"] = np.ascontiguousarray(tb)
      if m is not None:
        tm = _layer(m, site, i).reshape(_magnitude_shape(site, tb.shape[0]))
        tensors[f"{PREFIX}{names[0]}.{_MAGNITUDE}"] = np.ascontiguousarray(tm)
      ranks[rank].append(names[0])
      alphas[_number(alpha)].append(names[0])
    options["rslora"].add(leaf.rslora)
    options["dropout"].add(leaf.dropout)
    options["dora"].add(leaf.dora)
  for option, values in options.items():
    if len(values) > 1:
      raise ValueError(
        f"the LoRA leaves use {option} values {sorted(values)}; a PEFT config has one for all"
      )
  for site in extras:
    x = _host(leaves[site.path])
    for i, names in enumerate(site.names):
      value = _to_torch(_layer(x, site, i), site)
      tensors[f"{PREFIX}{names[0]}.{site.param}"] = np.ascontiguousarray(value)
  r = max(ranks, key=lambda k: len(ranks[k]))
  alpha = max(alphas, key=lambda k: len(alphas[k]))
  config = {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "r": r,
    "lora_alpha": alpha,
    "target_modules": _target_modules([n[0] for s in loras for n in s.names]),
    "rank_pattern": _pattern_keys(ranks, r),
    "alpha_pattern": _pattern_keys(alphas, alpha),
    "use_rslora": options["rslora"].pop(),
    "use_dora": options["dora"].pop(),
    "lora_dropout": options["dropout"].pop(),
    "bias": bias,
    "modules_to_save": modules_to_save or None,
    "init_lora_weights": True,
    "inference_mode": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "revision": None,
  }
  if any(leaves[s.path].e is not None for s in loras):
    config, tensors = _adalora.to_peft(config, tensors, loras, leaves, adalora, "save_peft")
  elif adalora is not None:
    raise ValueError("adalora= records AdaLoRA's settings, but params hold no AdaLoRA leaf")
  _write(path, config, tensors, overwrite)


def _magnitude_shape(site: _Site, n_out: int) -> tuple[int, ...]:
  """PEFT's shape of one layer's DoRA magnitude: ``(out,)``, a ``Conv2d``'s ``(1, out, 1, 1)``."""
  return (1, n_out, 1, 1) if site.kind == _torch_layout.CONV2D else (n_out,)


def _save_sites(params: Any, modules: Modules, trainable: Any, bias: str, layouts: Any):
  """The LoRA sites, the trained-leaf sites and ``modules_to_save``; unmapped is an error."""
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  chosen = trainable_mask(params, trainable=trainable, allow_empty=True)  # not the biases
  is_mark = lambda x: isinstance(x, bool) or is_lora(x)
  paths = [p for p, _ in _flat(params)]  # (_flat refuses stacks)
  _check_keys(modules, paths)
  layouts = _paths.check_patterns("layouts", layouts, paths, paths)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
  lora_modules = {_paths.path_str(k).rpartition("/")[0] for k, x in flat if is_lora(x)}
  loras, extras, to_save, unmapped = [], [], set(), []
  for (keys, leaf), mark, pick in zip(
    flat,
    jax.tree.leaves(mask, is_leaf=is_mark),
    jax.tree.leaves(chosen, is_leaf=is_mark),
    strict=True,
  ):
    path = _paths.path_str(keys)
    if not is_lora(leaf) and not mark:
      continue
    module = path.rpartition("/")[0]
    raw = _raw_names(modules, module)
    if not raw:
      unmapped.append(module)
    elif is_lora(leaf):
      leaf.check(path)
      loras.append(_kernel_site(path, raw, tuple(leaf.shape), leaf.roles))
    else:
      in_lora = module in lora_modules
      if pick and in_lora:
        raise ValueError(
          f"trainable selects {path!r}, in the module of a LoRA kernel: PEFT cannot train a "
          "module fully and adapt it (its trained biases go with bias='all' or 'lora_only')"
        )
      extras.append(_param_site(path, raw, leaf, layouts.lookup(path), in_lora))
      if pick:
        to_save |= {names[0] for names in extras[-1].names}
  if unmapped:
    raise ValueError(
      f"modules names no PyTorch module for {sorted(set(unmapped))[:8]}; map every module that "
      "holds a LoRA kernel or a trained leaf"
    )
  if not loras:
    raise ValueError("params hold no LoRA leaf to export; pass the tree returned by wrap")
  _check_distinct(loras, lambda s: "")
  _check_distinct(extras, lambda s: "." + s.param)
  return loras, extras, sorted(to_save)


def _write(path: str | os.PathLike, config: dict, tensors: dict, overwrite: bool) -> None:
  from safetensors.numpy import save_file

  final = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(final) and not overwrite:
    raise ValueError(f"{final!r} already exists; pass overwrite=True to replace it")
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(tmp, CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if os.path.exists(final):
    old = f"{final}.old-{os.getpid()}"
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)
  else:
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------


def serving_problems(
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  max_lora_rank: int = 16,
  heads: Sequence[str] = ("lm_head",),
) -> list[str]:
  """What vLLM would refuse in this adapter, one line each; empty if it serves it as is.

  vLLM serves plain LoRA on linear (and embedding) layers: no DoRA, no trained biases
  (unless the server enables them), no fully trained module but an output head, every rank
  at most the server's ``--max-lora-rank``, and one scale ``lora_alpha / r`` for every module
  (it reads no ``rank_pattern`` / ``alpha_pattern``).

  Args:
    params: the wrapped parameters.
    trainable: fully trained extra leaves, as for :func:`save_peft`.
    bias: the bias mode, as for :func:`save_peft`.
    max_lora_rank: the server's ``--max-lora-rank``, one of vLLM's choices.
    heads: module names (the last path component) that count as an output head.

  Returns:
    The problems, each naming the parameters concerned.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": {"kernel": jnp.ones((64, 64))}}, rank=32, targets=("fc",),
    ...                  key=jax.random.key(0))
    >>> lora_fn.serving_problems(p)
    ["rank 32 of ['fc/kernel'] is above the server's max_lora_rank 16"]
  """
  if max_lora_rank not in VLLM_RANKS:
    raise ValueError(f"max_lora_rank must be one of vLLM's {VLLM_RANKS}; got: {max_lora_rank!r}")
  _flat(params)  # refuses stacks
  is_mark = lambda x: isinstance(x, bool) or is_lora(x)
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  modules = trainable_mask(params, trainable=trainable, allow_empty=True)  # not bias=
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora)[0]
  loras, biases, whole = {}, [], []
  for (keys, leaf), mark, module in zip(
    flat,
    jax.tree.leaves(mask, is_leaf=is_mark),
    jax.tree.leaves(modules, is_leaf=is_mark),
    strict=True,
  ):
    path = _paths.path_str(keys)
    if is_lora(leaf):
      loras[path] = leaf
    elif module:
      whole.append(path)
    elif mark:
      biases.append(path)
  problems = []
  if biases:
    problems.append(
      f"it trains biases {biases[:4]}: vLLM needs bias='none' (or a server started with "
      "--enable-lora-bias)"
    )
  module_name = lambda p: p.rpartition("/")[0].rpartition("/")[2]
  others = [p for p in whole if module_name(p) not in heads]
  if others:
    problems.append(
      f"it trains {others[:4]} fully: vLLM takes no modules_to_save but an output head "
      f"{tuple(heads)}"
    )
  too_big = collections.defaultdict(list)
  scales = collections.defaultdict(list)
  convs = []
  for path, leaf in loras.items():
    if leaf.rank > max_lora_rank:
      too_big[leaf.rank].append(path)
    scales[leaf.scale].append(path)
    inner = [r for r in leaf.roles if r != "stack"]
    if _torch_layout.kind(path.rsplit("/", 1)[-1], inner) == _torch_layout.CONV2D:
      convs.append(path)
  for rank, paths in sorted(too_big.items()):
    problems.append(
      f"rank {rank} of {paths[:4]} is above the server's max_lora_rank {max_lora_rank}"
    )
  if len(scales) > 1:
    parts = [f"{s:g} for {p[:2]}" for s, p in sorted(scales.items())]
    problems.append(
      f"its modules have different scales alpha/r ({'; '.join(parts)}): vLLM scales every "
      "module by one lora_alpha / r"
    )
  if convs:
    problems.append(f"{convs[:4]} are convolutions: vLLM serves LoRA on linear layers")
  adaloras = [p for p, leaf in loras.items() if leaf.e is not None]
  if adaloras:
    problems.append(
      f"{adaloras[:4]} are AdaLoRA (peft_type ADALORA): vLLM serves LoRA; serve the merged "
      "weights (lorax_fn.merge) instead"
    )
  doras = [p for p, leaf in loras.items() if leaf.dora]
  if doras:
    problems.append(
      f"{doras[:4]} are DoRA (use_dora): vLLM serves plain LoRA only; serve the merged "
      "weights (lorax_fn.merge) instead"
    )
  return problems


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  from safetensors.numpy import load_file

  root = os.path.abspath(os.path.expanduser(os.fspath(path)))
  config_file, weights_file = os.path.join(root, CONFIG), os.path.join(root, WEIGHTS)
  for f in (config_file, weights_file):
    if not os.path.isfile(f):
      pickle = os.path.isfile(os.path.join(root, "adapter_model.bin"))
      hint = " (adapter_model.bin is a pickle: save it as safetensors)" if pickle else ""
      raise FileNotFoundError(f"PEFT adapter file {f!r} does not exist{hint}")
  try:
    with open(config_file) as fh:
      config = json.load(fh)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"PEFT adapter file {config_file!r} is damaged: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"PEFT adapter file {config_file!r} must hold a JSON object")
  try:
    tensors = load_file(weights_file)
  except Exception as e:  # safetensors has its own error types for a damaged file
    raise ValueError(f"PEFT adapter file {weights_file!r} is damaged: {e}") from e
  return config, tensors


def _check_config(config: dict, where: str) -> None:
  if config.get("peft_type") not in ("LORA", "ADALORA"):
    raise ValueError(
      f"{where}: peft_type {config.get('peft_type')!r} is not supported; lorax_fn reads LoRA "
      "and AdaLoRA adapters (peft_type 'LORA', 'ADALORA')"
    )
  for option, plain in _UNSUPPORTED.items():
    value = config.get(option, plain)
    if value not in (plain, None, False, [], {}):
      raise ValueError(
        f"{where}: {option}={value!r} is not supported (it changes what the adapter computes); "
        f"only {option}={plain!r} adapters load"
      )
  init = config.get("init_lora_weights", True)
  if init not in _PLAIN_INITS + _init.REDERIVED:
    raise ValueError(
      f"{where}: init_lora_weights={init!r} adapters are relative to a modified base that "
      f"lorax_fn cannot re-derive (it can for {_init.REDERIVED}); convert it to plain LoRA "
      "with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )
  for field in ("r", "lora_alpha"):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(f"{where}: {field} must be a positive number; got: {value!r}")


def _pattern_value(patterns: Any, name: str, default: Any) -> Any:
  """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)`` wins."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _load_sites(params: Any, modules: Modules, layouts: Any) -> tuple[dict, dict, dict]:
  """Every mapped kernel a LoRA factor may target, and every mapped leaf a tensor may replace.

  Returns ``(kernels, params_by_key, ambiguous)``: kernel sites by module name (with the layer
  index), leaf sites by ``"<module>.<param>"`` name, and kernels whose layout is unknown.
  """
  from lorax_fn._wrap import default_layout

  flat = _flat(params)
  paths = [p for p, _ in flat]
  _check_keys(modules, paths)
  layouts = _paths.check_patterns("layouts", layouts, paths, paths)
  kernels: dict[str, tuple[_Site, int]] = {}
  leaves: dict[str, tuple[_Site, int]] = {}
  ambiguous: dict[str, str] = {}
  owners: dict[str, str] = {}  # PyTorch module name -> our module path
  for path, leaf in flat:
    module, _, name = path.rpartition("/")
    raw = _raw_names(modules, module)
    if not raw:
      continue
    for n in raw:
      if owners.setdefault(n, module) != module:
        raise ValueError(
          f"modules maps both {owners[n]!r} and {module!r} to the PyTorch module {n!r}"
        )
    base = leaf.w if is_lora(leaf) else leaf
    shape = tuple(base.shape)
    roles = leaf.roles if is_lora(leaf) else layouts.lookup(path)
    if roles is None and name in _KERNEL_NAMES + ("w", "weight") and len(shape) >= 2:
      # A '{}' in the module name says axis 0 stacks layers: the rest is one layer's kernel.
      stacked = "{}" in raw[0]
      try:
        inner = default_layout(path, shape[1:] if stacked else shape)
        roles = ("stack",) * stacked + tuple(inner)
      except ValueError as e:
        for names in _per_layer(raw, shape[0], path) if "{}" in raw[0] else (raw,):
          for n in names:
            ambiguous[n] = str(e)
    if roles is not None:
      site = _kernel_site(path, raw, shape, tuple(roles))
      for i, names in enumerate(site.names):
        for n in names:
          _claim(kernels, n, site, i)
    if not is_lora(leaf):
      try:
        site = _param_site(path, raw, leaf, roles if name in _KERNEL_NAMES else None)
      except ValueError as e:  # an ambiguous layout: an error only if the adapter names it
        param = _PARAM_NAMES.get(name, name)
        ambiguous.update({f"{n}.{param}": str(e) for n in raw})
        continue
      for i, names in enumerate(site.names):
        for n in names:  # PEFT keeps the bias of a module it adapts as base_layer.bias
          _claim(leaves, f"{n}.{site.param}", site, i)
          _claim(leaves, f"{n}.base_layer.{site.param}", site, i)
  return kernels, leaves, ambiguous


def _claim(table: dict, name: str, site: _Site, layer: int) -> None:
  """Maps a PyTorch name to one of our paths; two paths on one name are an error."""
  if name in table and table[name][0].path != site.path:
    raise ValueError(
      f"modules maps both {table[name][0].path!r} and {site.path!r} to the PyTorch name {name!r}"
    )
  table[name] = (site, layer)


def load_peft(
  path: str | os.PathLike,
  params: Any,
  *,
  modules: Modules,
  layouts: Mapping[str, Sequence[str]] | None = None,
) -> Any:
  """Reads a PEFT LoRA directory (written by PEFT or :func:`save_peft`) into ``params``.

  The kernels the adapter targets become :class:`LoraLeaf` nodes with its factors, rank,
  alpha (``rank_pattern`` / ``alpha_pattern`` read as PEFT reads them), rsLoRA and dropout:
  a plain kernel is wrapped (its layout from ``layouts`` or :func:`default_layout`); a wrapped
  one must have the adapter's rank and alpha. ``modules_to_save`` (e.g. a classifier head)
  and trained biases replace the leaves they name. The model then computes what PEFT's
  computes on the matching PyTorch model. An AdaLoRA adapter (``peft_type "ADALORA"``) gives
  AdaLoRA leaves of rank ``init_r``, its pruned triplets zero. An adapter saved unconverted
  after a PiSSA or OLoRA init (``init_lora_weights`` ``"pissa"`` / ``"olora"``) is relative
  to the residual of the original kernel: as PEFT does, the init runs again on the
  (original, float) kernels given, and their residual becomes the base.

  Args:
    path: the PEFT directory.
    params: the base parameters (plain, wrapped or quantised).
    modules: our module paths to PyTorch module names (see :data:`Modules`); every name of a
      sequence is read (e.g. transformers 5 and 4 names).
    layouts: layouts of plain kernels, as for :func:`wrap`.

  Returns:
    ``params`` with the adapter in place.

  Raises:
    FileNotFoundError: a missing file (named).
    ValueError: a damaged file, a peft_type other than LoRA or an option lorax_fn does not
      support, modules the model lacks (named, with the nearest names), a factor whose shape
      does not fit (the safetensors key, expected and found shapes), or LoRA leaves of
      ``params`` the adapter does not cover.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> base = {"fc": {"kernel": jnp.ones((5, 7))}}
    >>> p = lora_fn.wrap(base, rank=2, targets=("fc",), key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/peft"
    >>> lora_fn.save_peft(d, p, modules={"fc": "model.fc"})
    >>> lora_fn.load_peft(d, base, modules={"fc": "model.fc"})["fc"]["kernel"].rank
    2
  """
  _check_modules(modules)
  where = f"PEFT adapter {os.fspath(path)!r}"
  config, tensors = _read(path)
  _check_config(config, where)
  kernels, leaves, ambiguous = _load_sites(params, modules, layouts)
  shapes = {p: tuple((x.w if is_lora(x) else x).shape) for p, x in _flat(params)}
  config, tensors, singular = _adalora.from_peft(config, tensors, kernels, shapes, where)
  factors: dict[str, dict[int, dict[str, tuple]]] = collections.defaultdict(dict)
  extras: dict[str, dict[int, tuple]] = collections.defaultdict(dict)
  sites: dict[str, _Site] = {}
  unknown = []
  for key, value in tensors.items():
    name = key.removeprefix(PREFIX)
    m = _FACTOR_KEY.fullmatch(name)
    if m:
      module, which = (m["m"], m["f"]) if m["m"] else (m["e"], m["g"]) if m["e"] else (m["d"], "M")
      if module in ambiguous:
        raise ValueError(f"{where} targets {module!r}, but {ambiguous[module]}")
      if module not in kernels:
        unknown.append(module)
        continue
      site, i = kernels[module]
      sites[site.path] = site
      factors[site.path].setdefault(i, {})[which[-1]] = (key, value, module)
    elif name in ambiguous:
      raise ValueError(f"{where} holds {key!r}, but {ambiguous[name]}")
    elif name in leaves:
      site, i = leaves[name]
      if config.get("fan_in_fan_out") and site.kind:
        raise ValueError(
          f"{where}: fan_in_fan_out=True stores {key!r} transposed (a GPT-2 Conv1D); "
          "lorax_fn reads such adapters' LoRA factors, not their fully trained kernels"
        )
      sites[site.path] = site
      extras[site.path][i] = (key, value)
    else:
      unknown.append(name.rpartition(".")[0] or name)
  if unknown:
    known = sorted(set(kernels) | {k.rpartition(".")[0] for k in leaves if ".base_layer." not in k})
    first = sorted(set(unknown))[0]
    raise ValueError(
      f"{where} names modules the model lacks: {sorted(set(unknown))[:6]}; nearest known "
      f"module names: {_paths.nearest_paths(first.rsplit('.', 1)[-1], known) if known else []}"
    )
  if not factors:
    raise ValueError(f"{where} holds no LoRA factors")
  out = dict(_flat(params))
  for target, layers in factors.items():
    out[target] = _lora_leaf(where, config, sites[target], out[target], layers)
    if singular is not None:  # AdaLoRA: the leaf's Λ, per layer
      out[target] = _adalora.with_singular(out[target], sites[target], layers, singular, where)
  for target, layers in extras.items():
    out[target] = _extra_leaf(where, sites[target], out[target], layers)
  missing = [p for p, x in _flat(params) if is_lora(x) and p not in factors]
  if missing:
    raise ValueError(
      f"{where} has no factors for the LoRA leaves {missing[:6]} of params; wrap only what "
      "the adapter targets, or pass the unwrapped base"
    )
  treedef = jax.tree_util.tree_structure(params, is_leaf=lambda x: is_lora(x) or is_quant(x))
  return jax.tree_util.tree_unflatten(treedef, [out[p] for p, _ in _flat(params)])


def _complete(where: str, site: _Site, layers: dict) -> list[int]:
  count = len(site.names)
  if sorted(layers) != list(range(count)):
    got = [site.names[i][0] for i in sorted(layers)]
    raise ValueError(
      f"{where} has {site.path!r} for the modules {got[:4]} only; it stacks {count} layers, "
      "and each needs its own"
    )
  return list(range(count))


def _lora_leaf(where: str, config: dict, site: _Site, leaf: Any, layers: dict) -> LoraLeaf:
  base = leaf.w if is_lora(leaf) else leaf
  shape = tuple(base.shape)
  inner_shape = shape[1:] if site.stacked else shape
  inner_roles = tuple(r for r in site.roles if r != "stack")
  names = [layers[i][f][2] for i in layers for f in layers[i]]
  dora = bool(config.get("use_dora", False))
  for i in layers:
    if not {"A", "B"} <= set(layers[i]):
      found = "lora_" + "".join(f for f in "AB" if f in layers[i]) if set(layers[i]) - {"M"} else ""
      raise ValueError(
        f"{where} has only {found or _MAGNITUDE} for {layers[i][next(iter(layers[i]))][2]!r}"
      )
    if dora != ("M" in layers[i]):
      module = layers[i]["A"][2]
      raise ValueError(
        f"{where} has use_dora={dora} but {'no' if dora else 'a'} {_MAGNITUDE} for {module!r}"
        + (" (a DoRA adapter needs one per adapted module)" if dora else "")
      )
  ranks = {_pattern_value(config.get("rank_pattern"), n, config["r"]) for n in names}
  alphas = {_pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"]) for n in names}
  if len(ranks) > 1 or len(alphas) > 1:
    raise ValueError(
      f"{where}: the layers of {site.path!r} have ranks {sorted(ranks)} and alphas "
      f"{sorted(alphas)}; a stacked kernel has one rank and one alpha"
    )
  rank, alpha = int(ranks.pop()), float(alphas.pop())
  a_shape, b_shape = factor_shapes(inner_shape, inner_roles, rank)
  want = _torch_layout.factor_shapes_torch(a_shape, b_shape, site.kind)
  m_shape = magnitude_shape(inner_shape, inner_roles)
  want_m = _magnitude_shape(site, math.prod(m_shape))
  a_list, b_list, m_list = [], [], []
  for i in _complete(where, site, layers):
    (ka, ta, _), (kb, tb, _) = layers[i]["A"], layers[i]["B"]
    checks = [(ka, ta, want[0]), (kb, tb, want[1])]
    if dora:
      checks.append((layers[i]["M"][0], layers[i]["M"][1], want_m))
    for k, t, w in checks:
      if tuple(t.shape) != tuple(w):
        raise ValueError(
          f"{where}: {k!r} has shape {tuple(t.shape)}; the {site.kind} at {site.path!r} "
          f"(kernel shape {inner_shape}, rank {rank}) needs {tuple(w)}"
        )
    a, b = _torch_layout.factors_from_torch(ta, tb, a_shape, b_shape, site.kind)
    a_list.append(a)
    b_list.append(b)
    if dora:
      m_list.append(layers[i]["M"][1].reshape(m_shape))
  a = np.stack(a_list) if site.stacked else a_list[0]
  b = np.stack(b_list) if site.stacked else b_list[0]
  m = (np.stack(m_list) if site.stacked else m_list[0]) if dora else None
  rslora = bool(config.get("use_rslora", False))
  dropout = float(config.get("lora_dropout") or 0.0)
  if is_lora(leaf) and (leaf.rank, leaf.alpha, leaf.rslora, leaf.dora) != (
    rank,
    alpha,
    rslora,
    dora,
  ):
    raise ValueError(
      f"{where}: {site.path!r} is wrapped with rank {leaf.rank}, alpha {leaf.alpha:g}, rslora "
      f"{leaf.rslora}, dora {leaf.dora}; the adapter has rank {rank}, alpha {alpha:g}, rslora "
      f"{rslora}, dora {dora}"
    )
  init = config.get("init_lora_weights", True)
  if init in _init.REDERIVED:
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    base = _init.peft_base(where, site.path, leaf, site.roles, rank, scale, init)
  dtype = jnp.float32 if jnp.finfo(base.dtype).bits < 32 else base.dtype
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  m = None if m is None else jnp.asarray(m, dtype)
  return LoraLeaf(base, a, b, tuple(site.roles), rank, alpha, rslora, dropout, m)


def _extra_leaf(where: str, site: _Site, leaf: Any, layers: dict) -> jax.Array:
  shape = tuple(np.shape(leaf))
  inner = shape[1:] if site.stacked else shape
  parts = []
  for i in _complete(where, site, layers):
    key, value = layers[i]
    if site.kind:
      inner_roles = tuple(r for r in site.roles if r != "stack")
      want = _torch_layout.torch_weight_shape(inner, inner_roles, site.kind)
      if tuple(value.shape) != tuple(want):
        raise ValueError(
          f"{where}: {key!r} has shape {tuple(value.shape)}; {site.path!r} needs {tuple(want)}"
        )
      value = _torch_layout.kernel_from_torch(value, inner, inner_roles, site.kind)
    elif math.prod(value.shape) != math.prod(inner):
      raise ValueError(
        f"{where}: {key!r} has shape {tuple(value.shape)}; {site.path!r} has shape {inner}"
      )
    parts.append(value.reshape(inner))
  value = np.stack(parts) if site.stacked else parts[0]
  return jnp.asarray(value, leaf.dtype)
