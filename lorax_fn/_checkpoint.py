"""``save_adapter``: Orbax checkpoints of the trained part only.

:mod:`lorax_fn._restore` reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lorax_fn import _paths
from lorax_fn._leaves import is_adapter, is_lora, is_stack
from lorax_fn._partition import trainable_mask

_FORMAT = "lorax_fn.adapter/1"


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def _host(x: Any) -> np.ndarray:
  """The whole array on this host (gathered from every process when it is split across them)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x))


def checksum(x: Any) -> str:
  """``sha256:<hex>`` of an array's dtype, shape and bytes (row-major)."""
  a = _host(x)
  h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
  h.update(a.tobytes())
  return "sha256:" + h.hexdigest()


def verify_checksums(arrays: Mapping[str, Any], saved: Mapping[str, str], where: str) -> None:
  """Raises ``ValueError`` naming the first array whose checksum differs from the saved one."""
  for path, x in arrays.items():
    if path in saved and checksum(x) != saved[path]:
      raise ValueError(
        f"{where} is damaged: the array {path!r} read back differs from the one saved "
        f"(checksum {checksum(x)}, saved {saved[path]}); restore an intact copy."
      )


def adapter_state(
  params: Any, *, trainable: _paths.Targets | None = None, bias: str = "none"
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The trained arrays as ``{path: array}`` and their LoRA configuration as JSON data.

  LoRA leaves contribute ``path/a`` and ``path/b`` (DoRA leaves ``path/m`` too); leaves
  selected by ``trainable`` / ``bias`` (see :func:`lorax_fn.trainable_mask`) contribute
  themselves. The frozen base is never included.
  """
  mask = trainable_mask(params, trainable=trainable, bias=bias)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]
  marks = jax.tree.leaves(mask, is_leaf=lambda x: isinstance(x, bool) or is_adapter(x))
  arrays: dict[str, Any] = {}
  lora: dict[str, Any] = {}
  extra: list[str] = []
  for (path, leaf), mark in zip(flat, marks, strict=True):
    p = _paths.path_str(path)
    if is_stack(leaf):
      raise ValueError(
        f"{p!r} holds a stack of {leaf.slots} adapters; save them one by one: "
        "unstack_adapter(params, slot)"
      )
    if is_lora(leaf):
      leaf.check(p)  # a half of split has no w (or no a, b) to record
      arrays[f"{p}/a"], arrays[f"{p}/b"] = leaf.a, leaf.b
      for field in ("m", "e"):  # DoRA's magnitude, AdaLoRA's singular values
        if getattr(leaf, field) is not None:
          arrays[f"{p}/{field}"] = getattr(leaf, field)
      lora[p] = {
        "shape": list(leaf.shape),
        "roles": list(leaf.roles),
        "rank": leaf.rank,
        "alpha": leaf.alpha,
        "rslora": leaf.rslora,
        "dropout": leaf.dropout,
        "dora": leaf.dora,
        "adalora": leaf.e is not None,
        "base_init": leaf.base_init,
      }
    elif mark:
      arrays[p] = leaf
      extra.append(p)
  shapes = {p: [list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in arrays.items()}
  return arrays, {"format": _FORMAT, "lora": lora, "trainable": extra, "arrays": shapes}


def adapter_config(
  params: Any, *, trainable: _paths.Targets | None = None, bias: str = "none"
) -> dict[str, Any]:
  """The JSON record :func:`save_adapter` writes (without ``metadata``), for any checkpoint.

  It names every LoRA leaf with its shape, axis roles, rank, alpha, rsLoRA, dropout, DoRA,
  AdaLoRA and the init that changed its base (PiSSA, OLoRA, LoftQ: factors trained on one
  base are wrong on another), the fully trained extra leaves, and the shape and dtype of
  each saved array. Store it with your own checkpoints (``train/run.py`` does) and compare
  with :func:`check_adapter_config`.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",), key=jax.random.key(0))
    >>> config = lora_fn.adapter_config(p)
    >>> config["lora"]["k"]["rank"], config["arrays"]["k/a"]
    (2, [[2, 5], 'float32'])
  """
  return adapter_state(params, trainable=trainable, bias=bias)[1]


def save_adapter(
  path: str | os.PathLike,
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  metadata: Mapping[str, Any] | None = None,
) -> None:
  """Saves the adapters (and the chosen fully trained leaves) with Orbax; never the base.

  The checkpoint holds the arrays and a JSON record of every LoRA leaf's rank, alpha, axis
  roles and shape, plus ``metadata`` (e.g. the base model id), so that restoring into a
  different model is an error rather than a silent mismatch. Orbax writes to a temporary
  directory and renames it when complete, so a crash never leaves a partial checkpoint.

  Args:
    path: directory to create; it must not exist.
    params: the wrapped parameters.
    trainable: fully trained extra leaves (e.g. ``("head",)``), as for :func:`optimizer`.
    bias: bias mode, as for :func:`optimizer`.
    metadata: JSON-serialisable data stored alongside, e.g. ``{"base_model": "..."}``.

  Raises:
    ValueError: if ``path`` exists, or two array paths would share one Orbax name.
    TypeError: if ``metadata`` is not a mapping of str keys to JSON values.
    NotADirectoryError: if a parent of ``path`` is a file.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",),
    ...                  key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/adapter"
    >>> lora_fn.save_adapter(d, p, metadata={"base_model": "toy"})
    >>> restored = lora_fn.restore_adapter(d, p)
    >>> bool((restored["k"].a == p["k"].a).all())
    True
  """
  arrays, config = adapter_state(params, trainable=trainable, bias=bias)
  config["metadata"] = _check_metadata(metadata)
  _check_orbax_names(arrays)
  root = _writable_path(path)
  # Orbax reads some damaged array files back without an error; these catch that.
  config["checksums"] = {p: checksum(x) for p, x in arrays.items()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(
      root,
      args=ocp.args.Composite(
        adapter=ocp.args.StandardSave(_nest(arrays)), config=ocp.args.JsonSave(config)
      ),
    )


def _resolve(path: str | os.PathLike) -> str:
  """An absolute local path (``~`` expanded), or a URL such as ``gs://...`` as given."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _writable_path(path: str | os.PathLike) -> str:
  root = _resolve(path)
  if "://" not in root:
    parent = os.path.dirname(root)
    while parent and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
      raise NotADirectoryError(
        f"cannot save the adapter to {os.fspath(path)!r}: {parent!r} is a file, not a directory"
      )
  return root


def _check_metadata(metadata: Any) -> dict[str, Any]:
  if metadata is None:
    return {}
  if not isinstance(metadata, Mapping):
    raise TypeError(f"metadata must be a mapping of str keys to JSON values; got: {metadata!r}")
  for k, v in metadata.items():
    if not isinstance(k, str):
      raise TypeError(f"metadata keys must be str; got: {k!r}")
    try:
      json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise TypeError(
        f"metadata[{k!r}] must be JSON-serialisable; got: {v!r} of type {type(v).__name__} ({e})"
      ) from e
  return dict(metadata)


def _check_orbax_names(arrays: Mapping[str, Any]) -> None:
  """Orbax stores ``a/b.c`` and ``a.b/c`` under one name (``a.b.c``): refuse such pairs."""
  seen: dict[str, str] = {}
  for p in arrays:
    name = p.replace("/", ".")
    if name in seen:
      raise ValueError(
        f"the paths {seen[name]!r} and {p!r} would be stored under one Orbax name {name!r}; "
        "rename one of the modules (a '.' in a module name meets a '/' elsewhere)"
      )
    seen[name] = p
