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
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorax_fn import _adalora_peft, _init, _paths, _torch_layout, _validate
from lorax_fn._leaves import is_lora
from lorax_fn._peft_sites import (
  _MAGNITUDE,
  CONFIG,
  PREFIX,
  WEIGHTS,
  Modules,
  _check_distinct,
  _check_keys,
  _check_modules,
  _flat,
  _host,
  _kernel_site,
  _layer,
  _magnitude_shape,
  _param_site,
  _raw_names,
  _Site,
  _trained_leaves,
)
from lorax_fn._serving import serving_problems


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
  residual_base: bool = False,
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
    initial: for adapters whose init changed the base (``init="pissa"``,
      ``"pissa_niter_K"``, ``"olora"``): the LoRA leaves as :func:`wrap` made them, before
      training (the tree it returned, or its trainable half from :func:`split`). The
      adapter is then written as PEFT's ``path_initial_model_for_weight_conversion`` writes
      it: a plain LoRA of rank ``2r``, ``[A; A₀]`` and ``[B, -B₀]`` (alpha doubled, ``√2×``
      with rsLoRA, so the scale stays), to load onto the ORIGINAL base, which vLLM serves.
    residual_base: write such adapters against the base in ``params`` instead (the
      residual that :func:`unwrap` returns, or LoftQ's quantised weight), which must then
      be shipped with them (PEFT's LoftQ recipe). Leaves whose init changed the base need
      ``initial`` or this; without either they are an error, never a silently wrong file.
    adalora: for AdaLoRA leaves (written as PEFT's ``peft_type "ADALORA"``, the triplets
      pruned to ``e = 0`` left out and named in ``rank_pattern``): the keyword arguments
      given to :func:`lorax_fn.adalora`, recorded as PEFT records its schedule (without
      them a placeholder schedule: PEFT needs one to load, inference ignores it).
    overwrite: replace an existing directory.

  Raises:
    ValueError: an unmapped module, two paths mapped to one name, an existing ``path``,
      options one PEFT config cannot hold (mixed rsLoRA or dropout), a leaf whose init
      changed the base without ``initial`` or ``residual_base``, or (``strict_serving``)
      what vLLM refuses.
    TypeError: ``residual_base`` is no bool.

  Example:
    >>> import json, pathlib, tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": {"kernel": jnp.ones((5, 7))}}, rank=2, targets=("fc",),
    ...                  key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/peft"
    >>> lora_fn.save_peft(d, p, modules={"fc": "model.fc"})
    >>> json.loads(pathlib.Path(d, "adapter_config.json").read_text())["target_modules"]
    ['model.fc']

    A PiSSA adapter needs ``initial`` (or ``residual_base``); with it, the plain LoRA of
    PEFT's conversion, rank ``2r``, for the original base:

    >>> w = jnp.arange(35.0).reshape(5, 7) / 35
    >>> p0 = lora_fn.wrap({"fc": {"kernel": w}}, rank=2, targets=("fc",),
    ...                   key=jax.random.key(0), init="pissa")
    >>> lora_fn.save_peft(d + "-pissa", p0, modules={"fc": "model.fc"}, initial=p0)
    >>> json.loads(pathlib.Path(d + "-pissa", "adapter_config.json").read_text())["r"]
    4
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
  residual_base = _validate.boolean("residual_base", residual_base)
  _init.check_export_base({s.path: leaves[s.path] for s in loras}, initial, residual_base)
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
    config, tensors = _adalora_peft.to_peft(config, tensors, loras, leaves, adalora, "save_peft")
  elif adalora is not None:
    raise ValueError("adalora= records AdaLoRA's settings, but params hold no AdaLoRA leaf")
  _write(path, config, tensors, overwrite)


def _save_sites(params: Any, modules: Modules, trainable: Any, bias: str, layouts: Any):
  """The LoRA sites, the trained-leaf sites and ``modules_to_save``; unmapped is an error."""
  paths = [p for p, _ in _flat(params)]  # (_flat refuses stacks)
  _check_keys(modules, paths)
  layouts = _paths.check_patterns("layouts", layouts, paths, paths)
  leaves = _trained_leaves(params, trainable, bias)
  lora_modules = {path.rpartition("/")[0] for path, x, _, _ in leaves if is_lora(x)}
  loras, extras, to_save, unmapped = [], [], set(), []
  for path, leaf, trained, pick in leaves:
    if not trained:
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
