"""AdaLoRA adapters as PEFT files (``peft_type "ADALORA"``), for ``save_peft`` and ``load_peft``.

PEFT's AdaLoRA keys have no ``.weight``: ``lora_A`` ``(r, in)`` (a ``Conv2d``'s ``(r,
in·kh·kw)``), ``lora_B`` ``(out, r)`` and ``lora_E`` ``(r, 1)``, each cut to the triplets its
``rank_pattern`` keeps; the config holds ``init_r`` and the rank allocator's schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn._adalora import is_adalora, kept_triplets

_PEFT_KINDS = ("Linear", "Conv2d")  # PEFT's SVDLinear and SVDConv2d

SETTINGS = {
  "target_r": None,  # default: init_r
  "total_step": 1,  # PEFT's config needs one; inference ignores the schedule
  "tinit": 0,
  "tfinal": 0,
  "deltaT": 1,
  "beta1": 0.85,
  "beta2": 0.85,
  "orth_reg_weight": 0.5,
}
"""PEFT's ``AdaLoraConfig`` schedule fields (the keyword arguments of :func:`adalora`)."""


def to_peft(
  config: dict, tensors: dict, sites: list, leaves: Mapping[str, Any], settings: Any, where: str
) -> tuple[dict, dict]:
  """A LoRA config and tensors (as ``save_peft`` builds them) as PEFT's AdaLoRA ones.

  The triplets whose ``e`` is exactly 0 (pruned) are left out, as PEFT's ``save_pretrained``
  resizes by ``rank_pattern``; the pattern is written, keys have no ``.weight``, ``lora_E``
  is ``(r, 1)``, and ``r`` is PEFT's ignored default 8. While every ``e`` is 0 (before any
  training step) nothing was pruned: all ``init_r`` triplets are written and
  ``rank_pattern`` is ``None``, as PEFT writes an AdaLoRA model before its first mask.
  """
  loras = [leaves[s.path] for s in sites]
  if not all(is_adalora(x) for x in loras):
    raise ValueError(
      f"{where}: params mix AdaLoRA and other LoRA leaves; a PEFT config has one peft_type"
    )
  if config["rank_pattern"] or config["alpha_pattern"]:
    raise ValueError(
      f"{where}: AdaLoRA leaves of different ranks or alphas; PEFT's AdaLoraConfig has one "
      "init_r and one lora_alpha"
    )
  if config["use_rslora"]:
    raise ValueError(f"{where}: AdaLoRA leaves scale by alpha / r, not rsLoRA's")
  others = [s.path for s in sites if s.kind not in _PEFT_KINDS]
  if others:
    raise ValueError(
      f"{where}: the AdaLoRA leaves at {others[:4]} are not Linear or Conv2d layers; PEFT's "
      "AdaLoRA adapts only those (wrap the others without adalora=True)"
    )
  chosen = dict(SETTINGS)
  if settings is not None:
    unknown = set(settings) - set(SETTINGS) - {"init_r"}
    if not isinstance(settings, Mapping) or unknown:
      raise ValueError(
        f"adalora must be a mapping with keys among {tuple(SETTINGS)} (the arguments of "
        f"lorax_fn.adalora); got: {settings!r}"
      )
    chosen.update({k: v for k, v in settings.items() if k != "init_r"})
  init_r = config["r"]
  if chosen["target_r"] is None:
    chosen["target_r"] = init_r
  kept, allocated = kept_triplets({s.path: x for s, x in zip(sites, loras, strict=True)})
  out, pattern = {}, {}
  for site, leaf in zip(sites, loras, strict=True):
    e = np.asarray(jax.device_get(leaf.e), np.float32)
    for i, names in enumerate(site.names):
      name, e_i = names[0], e[i] if site.stacked else e
      keep = kept[site.path][i] if site.stacked else kept[site.path]
      a = tensors.pop(f"base_model.model.{name}.lora_A.weight")
      b = tensors.pop(f"base_model.model.{name}.lora_B.weight")
      out[f"base_model.model.{name}.lora_A"] = np.ascontiguousarray(a.reshape(init_r, -1)[keep])
      out[f"base_model.model.{name}.lora_B"] = np.ascontiguousarray(
        b.reshape(b.shape[0], init_r)[:, keep]
      )
      out[f"base_model.model.{name}.lora_E"] = np.ascontiguousarray(e_i[keep][:, None])
      pattern[f"{name}.lora_E"] = keep.tolist()
  config = {
    **config,
    "peft_type": "ADALORA",
    "r": 8,
    "init_r": init_r,
    "rank_pattern": pattern if allocated else None,
    "alpha_pattern": {},
    **chosen,
  }
  return config, {**tensors, **out}


def from_peft(
  config: dict, tensors: dict, kernels: Mapping[str, Any], shapes: Mapping[str, Any], where: str
):
  """PEFT's AdaLoRA config and tensors as LoRA ones of rank ``init_r`` (pruned rows zero),
  and ``{module name: Λ}`` to set on the loaded leaves; LoRA files pass through."""
  if config.get("peft_type") != "ADALORA":
    return config, tensors, None
  init_r = config.get("init_r")
  if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r <= 0:
    raise ValueError(f"{where}: init_r must be a positive int; got: {init_r!r}")
  pattern = config.get("rank_pattern") or {}
  out, singular = {}, {}
  for key, value in tensors.items():
    name = key.removeprefix("base_model.model.")
    module, _, which = name.rpartition(".")
    if which not in ("lora_A", "lora_B", "lora_E") or module not in kernels:
      out[key] = value
      continue
    site = kernels[module][0]
    if site.kind not in _PEFT_KINDS:
      raise ValueError(f"{where}: {key!r}: PEFT's AdaLoRA adapts Linear and Conv2d layers")
    keep = np.asarray(pattern.get(f"{module}.lora_E", [True] * init_r), bool)
    if keep.shape != (init_r,) or value.shape[0 if which != "lora_B" else 1] != keep.sum():
      raise ValueError(
        f"{where}: {key!r} has shape {tuple(value.shape)}; with init_r {init_r} and its "
        f"rank_pattern it needs {int(keep.sum())} ranks"
      )
    rows = np.moveaxis(value, 1, 0) if which == "lora_B" else value
    full = np.zeros((init_r,) + rows.shape[1:], value.dtype)
    full[keep] = rows
    if which == "lora_E":
      singular[module] = full[:, 0]
      continue
    if which == "lora_B":
      full = np.moveaxis(full, 0, 1)
    if site.kind == "Conv2d":  # PEFT's SVDConv2d keeps A (r, in·kh·kw), B (out, r)
      kh, kw, cin, _ = (
        d for d, r in zip(shapes[site.path], site.roles, strict=True) if r != "stack"
      )
      full = full.reshape(init_r, cin, kh, kw) if which == "lora_A" else full[:, :, None, None]
    out[f"{key}.weight"] = full
  lora = {**config, "peft_type": "LORA", "r": init_r, "rank_pattern": {}, "alpha_pattern": {}}
  return lora, out, singular


def with_singular(leaf: Any, site: Any, layers: Mapping, singular: Mapping, where: str) -> Any:
  """``leaf`` (loaded as LoRA) with the ``Λ`` of its module(s) from PEFT's ``lora_E``."""
  values = []
  for i in sorted(layers):
    module = layers[i]["A"][2]
    if module not in singular:
      raise ValueError(f"{where} has no lora_E for {module!r}, an AdaLoRA module")
    values.append(singular[module])
  e = np.stack(values) if site.stacked else values[0]
  return dataclasses.replace(leaf, e=jnp.asarray(e, leaf.a.dtype))
