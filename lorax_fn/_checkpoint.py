"""``save_adapter`` / ``restore_adapter``: Orbax checkpoints of the trained part only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON record written by :func:`save_adapter` (LoRA leaves, extras, metadata).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if ``path`` is not an adapter checkpoint or its record is damaged.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",),
    ...                  key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/adapter"
    >>> lora_fn.save_adapter(d, p, metadata={"base_model": "toy"})
    >>> config = lora_fn.read_adapter_config(d)
    >>> config["lora"]["k"]["rank"], config["metadata"]
    (2, {'base_model': 'toy'})
  """
  where = f"adapter checkpoint {os.fspath(path)!r}"
  root = _checkpoint_dir(path, where)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      config = ckpt.restore(root, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except _NOT_DAMAGE:
    raise
  except Exception as e:  # Orbax raises bare Exceptions for unreadable files
    raise ValueError(
      f"{where} is damaged: its record {os.fspath(root / 'config')!r} cannot be read "
      f"({type(e).__name__}: {_first_line(e)})"
    ) from e
  if not isinstance(config, dict) or config.get("format") != _FORMAT:
    raise ValueError(
      f"{where} is not a lorax_fn adapter checkpoint (its record is {config!r:.200})"
    )
  return config


# Errors that say something other than "this file is damaged": a bug, no memory, no access.
_NOT_DAMAGE = (AttributeError, NameError, ImportError, MemoryError, PermissionError)


def _first_line(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else "no message"


def _checkpoint_dir(path: str | os.PathLike, where: str) -> epath.Path:
  """The checkpoint directory, or a clear error when ``path`` is not one."""
  root = epath.Path(_resolve(path))
  if not root.exists():
    raise FileNotFoundError(f"{where} does not exist")
  if not root.is_dir() or not (root / "config").is_dir() or not (root / "adapter").is_dir():
    found = sorted(c.name for c in root.iterdir()) if root.is_dir() else "a file"
    hint = ""
    if isinstance(found, list) and found and all(n.isdigit() for n in found):
      hint = (
        "; it looks like a training checkpoint directory (one sub-directory per step): "
        "restore the adapter saved with lorax_fn.save_adapter (train/run.py writes "
        "workdir/best_adapter) instead"
      )
    raise ValueError(
      f"{where} is not an adapter checkpoint written by lorax_fn.save_adapter: it has no "
      f"'config' and 'adapter' items (found: {found if isinstance(found, str) else found[:10]})"
      f"{hint}."
    )
  return root


def check_adapter_config(
  saved: Mapping[str, Any], current: Mapping[str, Any], where: str = "the saved adapter"
) -> None:
  """Raises ``ValueError`` describing the first difference between two adapter configs.

  Args:
    saved: a record from :func:`adapter_config` (or :func:`read_adapter_config`).
    current: the record of the model to load into.
    where: how the message names the saved side (e.g. a checkpoint path).

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> w = {"k": jnp.ones((5, 7))}
    >>> r2 = lora_fn.adapter_config(lora_fn.wrap(w, rank=2, targets=("k",), key=jax.random.key(0)))
    >>> r3 = lora_fn.adapter_config(lora_fn.wrap(w, rank=3, targets=("k",), key=jax.random.key(0)))
    >>> lora_fn.check_adapter_config(r2, r3, "run A")
    Traceback (most recent call last):
    ...
    ValueError: run A: LoRA leaf 'k' was saved with rank=2 but the model has rank=3.
  """
  _check_record(saved, where)
  _check_record(current, "current")
  s_lora, c_lora = saved["lora"], current["lora"]
  if set(s_lora) != set(c_lora):
    raise ValueError(
      f"{where} holds LoRA leaves {sorted(s_lora)} but the model has {sorted(c_lora)}; "
      "the targets differ."
    )
  for p, s in s_lora.items():
    c = c_lora[p]
    for field in ("shape", "roles", "rank", "alpha", "rslora", "dora", "adalora", "base_init"):
      default = None if field == "base_init" else False  # older records lack the newer fields
      saved_value, value = s.get(field, default), c.get(field, default)
      if saved_value != value:
        raise ValueError(
          f"{where}: LoRA leaf {p!r} was saved with {field}={saved_value!r} but the model has "
          f"{field}={value!r}."
        )
  if sorted(saved["trainable"]) != sorted(current["trainable"]):
    raise ValueError(
      f"{where} holds fully trained leaves {sorted(saved['trainable'])} but the model "
      f"trains {sorted(current['trainable'])}."
    )
  if set(saved["arrays"]) != set(current["arrays"]):
    raise ValueError(
      f"{where} holds arrays {sorted(saved['arrays'])[:8]} but the model has "
      f"{sorted(current['arrays'])[:8]}."
    )
  for p, spec in saved["arrays"].items():
    if spec != current["arrays"][p]:
      raise ValueError(
        f"{where}: {p!r} was saved with shape and dtype {spec} but the model has "
        f"{current['arrays'][p]}."
      )


_RECORD_KEYS = {"lora": dict, "trainable": list, "arrays": dict}
_LEAF_KEYS = ("shape", "roles", "rank", "alpha", "rslora")


def _check_record(record: Any, where: str) -> None:
  """Raises ``ValueError`` unless ``record`` has the shape :func:`adapter_config` gives."""
  if not isinstance(record, Mapping):
    raise ValueError(
      f"{where}: an adapter record must be a mapping from lorax_fn.adapter_config or "
      f"read_adapter_config; got: {type(record).__name__}"
    )
  if record.get("format") != _FORMAT:
    raise ValueError(
      f"{where} is not a lorax_fn adapter checkpoint (format {record.get('format')!r}, "
      f"expected {_FORMAT!r})."
    )
  for key, kind in _RECORD_KEYS.items():
    if not isinstance(record.get(key), kind):
      raise ValueError(
        f"{where}: the adapter record's {key!r} must be a {kind.__name__}; got: "
        f"{record.get(key)!r:.80} (keys: {sorted(record)})"
      )
  for p, leaf in record["lora"].items():
    if not isinstance(leaf, Mapping) or any(k not in leaf for k in _LEAF_KEYS):
      raise ValueError(
        f"{where}: the record of LoRA leaf {p!r} must have keys {_LEAF_KEYS}; got: {leaf!r:.120}"
      )


def restore_adapter(
  path: str | os.PathLike,
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  metadata: Mapping[str, Any] | None = None,
) -> Any:
  """Restores adapters saved by :func:`save_adapter` into ``params``.

  Args:
    path: the checkpoint directory.
    params: wrapped parameters of the same targets, ranks and alphas (the base weights
      come from here; only the adapter arrays are read from disk).
    trainable: fully trained extra leaves, as given to :func:`save_adapter`.
    bias: bias mode, as given to :func:`save_adapter`.
    metadata: if given, every key must equal the saved metadata's (e.g. the base model id).

  Returns:
    ``params`` with the saved adapter (and extra) arrays in place.

  Raises:
    ValueError: if the checkpoint's targets, ranks, alphas, layouts, shapes, extra leaves
      or metadata differ from ``params``', if ``path`` is not an adapter checkpoint, or if
      it is damaged (a file cannot be read, or an array's checksum differs: named).
    FileNotFoundError: if ``path`` does not exist.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",),
    ...                  key=jax.random.key(0))
    >>> d = tempfile.mkdtemp() + "/adapter"
    >>> lora_fn.save_adapter(d, p)
    >>> other = lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=3, targets=("k",),
    ...                      key=jax.random.key(0))
    >>> lora_fn.restore_adapter(d, other)
    Traceback (most recent call last):
    ...
    ValueError: adapter checkpoint '...': LoRA leaf 'k' was saved with rank=2 but ...rank=3.
  """
  arrays, current = adapter_state(params, trainable=trainable, bias=bias)
  saved = read_adapter_config(path)
  where = f"adapter checkpoint {os.fspath(path)!r}"
  check_adapter_config(saved, current, where)
  for k, v in _check_metadata(metadata).items():
    if saved["metadata"].get(k) != v:
      raise ValueError(f"{where} has metadata {k}={saved['metadata'].get(k)!r}; expected {v!r}.")
  # Abstract targets: Orbax checks shapes and restores jax arrays with the model's shardings.
  target = _nest({p: _abstract(x) for p, x in arrays.items()})
  root = _checkpoint_dir(path, where)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      loaded = ckpt.restore(
        root, args=ocp.args.Composite(adapter=ocp.args.StandardRestore(target))
      )["adapter"]
  except _NOT_DAMAGE:
    raise
  except Exception as e:  # Orbax raises bare Exceptions for unreadable files
    raise ValueError(
      f"{where} is damaged: its arrays in {os.fspath(root / 'adapter')!r} cannot be read "
      f"({type(e).__name__}: {_first_line(e)})"
    ) from e
  loaded = _flatten(loaded)
  verify_checksums(loaded, saved.get("checksums", {}), where)
  return load_adapter_state(params, loaded)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def load_adapter_state(params: Any, arrays: Mapping[str, Any]) -> Any:
  """Puts ``{path: array}`` from :func:`adapter_state` back into ``params``."""

  def put(path: Any, leaf: Any) -> Any:
    p = _paths.path_str(path)
    if is_lora(leaf) and f"{p}/a" in arrays:
      m, e = arrays.get(f"{p}/m", leaf.m), arrays.get(f"{p}/e", leaf.e)
      return dataclasses.replace(leaf, a=arrays[f"{p}/a"], b=arrays[f"{p}/b"], m=m, e=e)
    return arrays.get(p, leaf)

  return jax.tree_util.tree_map_with_path(put, params, is_leaf=is_lora)
