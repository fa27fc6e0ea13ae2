"""``restore_adapter``: reads what ``save_adapter`` (:mod:`lorax_fn._checkpoint`) wrote.

Every array is checked against its saved checksum and every LoRA leaf's record against the
params it is restored into, so a damaged or mismatched checkpoint is an error naming the
leaf, never a silently wrong adapter.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lorax_fn import _paths
from lorax_fn._checkpoint import (
  _FORMAT,
  _check_metadata,
  _flatten,
  _nest,
  _resolve,
  adapter_state,
  verify_checksums,
)
from lorax_fn._leaves import is_lora


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
  config = _read_item(root, "config", ocp.args.JsonRestore(), f"{where} is damaged: its record")
  if not isinstance(config, dict) or config.get("format") != _FORMAT:
    raise ValueError(
      f"{where} is not a lorax_fn adapter checkpoint (its record is {config!r:.200})"
    )
  return config


# Errors that say something other than "this file is damaged": a bug, no memory, no access.
_NOT_DAMAGE = (AttributeError, NameError, ImportError, MemoryError, PermissionError)


def _first_line(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else "no message"


def _read_item(root: epath.Path, item: str, args: Any, damaged: str) -> Any:
  """One item of the checkpoint; an unreadable one is a ``ValueError`` starting ``damaged``."""
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      return ckpt.restore(root, args=ocp.args.Composite(**{item: args}))[item]
  except _NOT_DAMAGE:
    raise
  except Exception as e:  # Orbax raises bare Exceptions for unreadable files
    raise ValueError(
      f"{damaged} {os.fspath(root / item)!r} cannot be read ({type(e).__name__}: {_first_line(e)})"
    ) from e


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
  loaded = _read_item(
    root, "adapter", ocp.args.StandardRestore(target), f"{where} is damaged: its arrays in"
  )
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
