"""``load_peft``: a PEFT LoRA or AdaLoRA directory (PEFT's own or ``save_peft``'s) into params.

Factors are read in PyTorch's layouts (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``, a
``Conv2d``'s and an ``Embedding``'s, DoRA's ``lora_magnitude_vector``) and turned into each
kernel's axis roles; ``modules_to_save`` and trained biases replace the leaves they name.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _adalora_peft, _init, _paths, _torch_layout
from lorax_fn._leaves import LoraLeaf, factor_shapes, is_lora, magnitude_shape
from lorax_fn._peft_sites import (
  _KERNEL_NAMES,
  _MAGNITUDE,
  _PARAM_NAMES,
  CONFIG,
  PREFIX,
  WEIGHTS,
  Modules,
  _check_keys,
  _check_modules,
  _flat,
  _kernel_site,
  _magnitude_shape,
  _param_site,
  _per_layer,
  _raw_names,
  _Site,
)
from lorax_fn._quant import is_quant

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
# Inits that only choose the starting factors (EVA: A from activations, B = 0; orthogonal:
# B·A = 0; MiCA: A = 0, B frozen): the base stays the original, the adapter is a plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# Why lorax_fn cannot re-derive the base of the other PEFT inits that change it.
_CHANGED_BASE = {
  "pissa_niter": "the residual of torch's randomized SVD, whose random test matrix lorax_fn "
  "cannot reproduce",
  "corda": "the residual of a decomposition driven by the training data's activations",
  "lora_ga": "the original minus an offset from the training data's gradients",
  "loftq": "LoftQ's quantised weight (PEFT's conversion does not cover LoftQ either)",
}
_FACTOR_KEY = re.compile(
  r"(?P<m>.+)\.(?P<f>lora_A|lora_B)\.weight|(?P<e>.+)\.(?P<g>lora_embedding_A|lora_embedding_B)"
  r"|(?P<d>.+)\.lora_magnitude_vector(?:\.weight)?"
)


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
    _refuse_init(init, where)
  for field in ("r", "lora_alpha"):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(f"{where}: {field} must be a positive number; got: {value!r}")


def _refuse_init(init: Any, where: str) -> None:
  """A ``ValueError`` saying why an adapter of this ``init_lora_weights`` does not load, and
  what does."""
  kind = "pissa_niter" if str(init).startswith("pissa_niter_") else init
  if kind not in _CHANGED_BASE:
    raise ValueError(
      f"{where}: init_lora_weights={init!r} is not a PEFT init lorax_fn knows; it reads "
      f"{_PLAIN_INITS + _init.REDERIVED}"
    )
  raise ValueError(
    f"{where}: init_lora_weights={init!r}: the adapter is relative to the base that init made, "
    f"{_CHANGED_BASE[kind]}; lorax_fn re-derives that base only for {_init.REDERIVED}. Either "
    "convert it with PEFT to a plain LoRA on the original base (peft_model.save_pretrained(out, "
    "path_initial_model_for_weight_conversion=<the adapter saved right after get_peft_model>), "
    "for PiSSA and CorDA), or load it onto the base it was trained on, saved from PEFT, with "
    "init_lora_weights set to true in its adapter_config.json (PEFT's LoftQ recipe)"
  )


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
  (original, float) kernels given, and their residual becomes the base. Inits that only
  choose the starting factors (``"gaussian"``, ``"eva"``, ``"orthogonal"``, ``"mica"``) give
  plain LoRA adapters; those whose changed base lorax_fn cannot re-derive
  (``"pissa_niter_K"``, ``"corda"``, ``"lora_ga"``, ``"loftq"``) are refused with the way
  to convert them.

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
    ValueError: a damaged file, a peft_type other than LoRA or AdaLoRA, an option lorax_fn
      does not support (named, e.g. an ``init_lora_weights`` whose base it cannot
      re-derive), modules the model lacks (named, with the nearest names), a factor whose
      shape does not fit (the safetensors key, expected and found shapes), or LoRA leaves of
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
  config, tensors, singular = _adalora_peft.from_peft(config, tensors, kernels, shapes, where)
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
      out[target] = _adalora_peft.with_singular(out[target], sites[target], layers, singular, where)
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
  base_init = leaf.base_init if is_lora(leaf) else None  # a wrapped leaf keeps its base
  if init in _init.REDERIVED:
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    base = _init.peft_base(where, site.path, leaf, site.roles, rank, scale, init)
    base_init = init
  dtype = jnp.float32 if jnp.finfo(base.dtype).bits < 32 else base.dtype
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  m = None if m is None else jnp.asarray(m, dtype)
  roles = tuple(site.roles)
  return LoraLeaf(base, a, b, roles, rank, alpha, rslora, dropout, m, base_init=base_init)


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
