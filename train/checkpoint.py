"""Training checkpoints for ``train/run.py``: the state keyed by tree path, every array checksummed.

A checkpoint step holds two Orbax items: ``state``, the train state as nested dicts keyed by
the names along each leaf's tree path (NamedTuple fields such as Adam's ``mu`` / ``nu`` /
``count`` by name, dict keys, sequence indices; ``None`` gaps skipped), and ``meta``, JSON
that also lists the sha256, dtype and shape of every saved array. Restoring looks each leaf
up by its path, so a reordered optimizer state can never swap ``mu`` and ``nu`` silently.

A step whose files cannot be read or whose arrays do not match their checksums (a truncated
file, flipped bytes, a disk that filled up) is moved aside to ``<directory>_damaged/STEP``,
where the checkpoint manager no longer sees it, and the next older step is tried. Steps
written by the earlier positional format (``{"00000": leaf, ...}``) still restore.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

FORMAT = "tree_path"
"""``meta["state_format"]`` of checkpoints keyed by tree path."""

Names = tuple[str, ...]
"""The names along a leaf's tree path."""


class DamagedCheckpoint(Exception):
  """A checkpoint step that cannot be read back as it was written."""


# ------------------------------------------------------------------------------------------
# Trees keyed by path
# ------------------------------------------------------------------------------------------


def _name(entry: Any) -> str:
  """One tree-path entry as a name: a dict key, a field name or a sequence index."""
  return jax.tree_util.keystr((entry,), simple=True)


def leaf_paths(tree: Any) -> list[tuple[Names, Any]]:
  """``(names, leaf)`` of every leaf, in ``jax.tree.leaves`` order (``None`` gaps skipped).

  Raises:
    ValueError: a name holding ``/`` or ``.`` (Orbax joins names with ``.``; the JSON
      listing with ``/``), or two leaves with the same names.
  """
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(_name(e) for e in path)
    bad = [n for n in names if not n or "/" in n or "." in n]
    if bad:
      raise ValueError(f"tree path names must be non-empty, without '/' or '.'; got: {bad}")
    out.append((names, leaf))
  if len({names for names, _ in out}) != len(out):
    raise ValueError("two leaves of the train state have the same tree path names")
  return out


def nest(flat: Mapping[Names, Any]) -> dict[str, Any]:
  """``{("a", "b"): x}`` -> ``{"a": {"b": x}}``."""
  out: dict[str, Any] = {}
  for names, leaf in flat.items():
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf
  return out


def flatten(nested: Mapping[str, Any], prefix: Names = ()) -> dict[Names, Any]:
  """The inverse of :func:`nest`."""
  out: dict[Names, Any] = {}
  for name, value in nested.items():
    if isinstance(value, Mapping):
      out |= flatten(value, (*prefix, name))
    else:
      out[(*prefix, name)] = value
  return out


def show(names: Names) -> str:
  return "/".join(names)


# ------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------


def host_arrays(tree: Any) -> Any:
  """The full value of every array on this host (a collective when several processes run)."""
  if jax.process_count() > 1:
    # Global arrays come back whole (replicated) on every process.
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree.map(np.asarray, tree)


def checksum(x: np.ndarray) -> dict[str, Any]:
  """sha256 of the array's bytes (C order), with its dtype and shape."""
  data = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  return {"sha256": hashlib.sha256(data).hexdigest(), "dtype": str(x.dtype), "shape": list(x.shape)}


def verify(arrays: Mapping[Names, np.ndarray], listing: Any) -> None:
  """Checks the arrays read back against the checksums written with them.

  Raises:
    DamagedCheckpoint: naming the first array that is missing, extra or differs.
  """
  if not isinstance(listing, Mapping):
    raise DamagedCheckpoint("its meta lists no array checksums")
  read = {show(names): x for names, x in arrays.items()}
  unmatched = sorted(set(listing) ^ set(read))
  if unmatched:
    name = unmatched[0]
    where = "listed in its meta but not saved" if name in listing else "saved but not listed"
    raise DamagedCheckpoint(f"array {name} is {where}")
  for name in sorted(read):
    if checksum(read[name]) != listing[name]:
      raise DamagedCheckpoint(f"array {name} does not match its checksum")


# ------------------------------------------------------------------------------------------
# Reading a step
# ------------------------------------------------------------------------------------------


def _read_arrays(path: epath.Path) -> dict[Names, np.ndarray]:
  """Every array of an Orbax pytree item, whole, as numpy, on this host.

  The handler is used directly: the checkpointer's restore ends in a barrier across
  processes, which one process that failed to read would never reach.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(path)
    tree = getattr(metadata, "tree", metadata)  # orbax < 0.11.x returned the tree itself
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return flatten(handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))
  finally:
    handler.close()


def is_positional(arrays: Mapping[Names, Any]) -> bool:
  """True for the earlier layout: ``{"00000": leaf, ...}`` by position."""
  return bool(arrays) and all(len(p) == 1 and len(p[0]) == 5 and p[0].isdigit() for p in arrays)


# Errors that say something other than "this step is damaged": a bug, no memory, no access.
_NOT_DAMAGE = (AttributeError, NameError, ImportError, MemoryError, PermissionError)


def read_step(path: epath.Path) -> tuple[dict[str, Any], dict[Names, np.ndarray]]:
  """The meta and the arrays of one checkpoint step, checked against their checksums.

  Raises:
    DamagedCheckpoint: a file is missing or unreadable, or an array differs from its
      checksum. Checkpoints of the positional format carry no checksums: only read errors
      are found in them.
  """
  _quiet_closed_event_loops()  # before the read: the noise may come before its error does
  try:
    meta = ocp.JsonCheckpointHandler().restore(path / "meta", args=ocp.args.JsonRestore())
    arrays = _read_arrays(path / "state")
  except _NOT_DAMAGE:
    raise
  except Exception as e:  # JSON, UTF-8, TensorStore errors, and Orbax's bare Exceptions
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise DamagedCheckpoint(f"{type(e).__name__}: {first_line[:200]}") from e
  if not isinstance(meta, dict):
    raise DamagedCheckpoint("its meta is not a JSON object")
  if not is_positional(arrays):
    verify(arrays, meta.get("arrays"))
  return meta, arrays


def _quiet_closed_event_loops() -> None:
  """Drops the unraisable ``RuntimeError('Event loop is closed')`` that a failed read leaves.

  When one array of a restore fails, Orbax closes its event loop while TensorStore still
  completes the reads of the other arrays; each completion then reports this error as
  "unraisable": a traceback on stderr that looks like a crash but is not one. Installed once
  per process (idempotent); every other unraisable goes to the hook that was there.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loops", False):
    return

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loops = True
  sys.unraisablehook = hook


# ------------------------------------------------------------------------------------------
# Placing the arrays read back into the live state
# ------------------------------------------------------------------------------------------


def _lookup(like: Any, arrays: Mapping[Names, np.ndarray]) -> list[np.ndarray]:
  """The saved array of each leaf of ``like``: by position (old format) or by path."""
  leaves = leaf_paths(like)
  if is_positional(arrays):
    if len(arrays) != len(leaves):
      raise ValueError(
        f"the checkpoint holds {len(arrays)} arrays by position, the train state has "
        f"{len(leaves)} leaves; it was written for another model or optimizer"
      )
    return [arrays[k] for k in sorted(arrays)]
  wanted = {names for names, _ in leaves}
  missing, extra = sorted(wanted - set(arrays)), sorted(set(arrays) - wanted)
  parts = [f"missing {_some(missing)}"] if missing else []
  parts += [f"not in this run {_some(extra)}"] if extra else []
  if parts:
    raise ValueError(
      f"the checkpoint's train state does not fit this run's: {'; '.join(parts)} (another "
      "model, optimizer or set of trainable leaves?)"
    )
  return [arrays[names] for names, _ in leaves]


def _some(paths: list[Names]) -> str:
  more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
  return ", ".join(show(p) for p in paths[:3]) + more


def place(like: Any, arrays: Mapping[Names, np.ndarray]) -> Any:
  """``like`` with each leaf replaced by its saved array, on the leaf's sharding.

  Raises:
    ValueError: naming the leaf whose path is missing or extra, or whose dtype or shape
      differs from the live state's.
  """
  values = _lookup(like, arrays)
  out = []
  for (names, x), v in zip(leaf_paths(like), values, strict=True):
    if tuple(v.shape) != tuple(x.shape) or v.dtype != x.dtype:
      raise ValueError(
        f"checkpoint array {show(names)} is {v.dtype}{list(v.shape)}; this run's is "
        f"{x.dtype}{list(x.shape)}"
      )
    out.append(jax.make_array_from_callback(x.shape, x.sharding, _slicer(v)))
  return jax.tree.unflatten(jax.tree.structure(like), out)


def _slicer(value: np.ndarray) -> Callable[[Any], np.ndarray]:
  return lambda index: np.asarray(value[index])


# ------------------------------------------------------------------------------------------
# The manager
# ------------------------------------------------------------------------------------------


class Checkpoints:
  """Orbax-managed train-state checkpoints in ``directory``, keyed by path and checksummed.

  Every process calls every method (Orbax writes sharded arrays from all of them).

  Args:
    directory: where the steps are written (absolute, or a remote URL).
    keep: how many of the newest steps to keep.
  """

  def __init__(self, directory: str, *, keep: int):
    self.directory = directory
    self.damaged_directory = directory.rstrip("/") + "_damaged"
    self._mngr = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep),
      item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Writes ``state`` keyed by path and ``meta`` with every array's checksum (async)."""
    leaves = leaf_paths(state)
    values = host_arrays([x for _, x in leaves])
    listing = {show(names): checksum(v) for (names, _), v in zip(leaves, values, strict=True)}
    self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(nest(dict(leaves))),
        meta=ocp.args.JsonSave({**meta, "state_format": FORMAT, "arrays": listing}),
      ),
    )

  def restore_latest(
    self,
    like: Any,
    *,
    check_meta: Callable[[dict[str, Any]], None],
    log: Callable[[str], None] = print,
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest intact step: ``(step, state like `like`, meta)``, or ``None`` if none.

    Damaged steps are moved aside (one line each says which and why) and older ones tried.

    Args:
      like: the live train state; its leaves give paths, dtypes, shapes and shardings.
      check_meta: raises ``ValueError`` if the run cannot resume from this meta, e.g. it was
        trained with another rank (the error propagates), or ``DamagedCheckpoint`` if the
        meta lacks what it needs.
      log: where the one-line messages go (process 0 only).

    Raises:
      ValueError: from ``check_meta``, or a saved state that does not fit ``like``.
    """
    moved = False
    for step in sorted(self._mngr.all_steps(), reverse=True):
      path = epath.Path(self.directory) / str(step)
      # Every process agrees that the step is readable before any judges its meta, so none
      # waits in a collective that another left with an error.
      reason = None
      try:
        meta, arrays = read_step(path)
      except DamagedCheckpoint as e:
        reason = str(e)
      reason = _agree(reason)
      if reason is None:
        try:
          check_meta(meta)  # the same file everywhere: the same verdict on every process
        except DamagedCheckpoint as e:
          reason = str(e)
      if reason is not None:
        aside = self._move_aside(step)
        if jax.process_index() == 0:
          log(
            f"checkpoint step {step} in {self.directory} is damaged ({reason}); "
            f"moved it to {aside} and trying an older one"
          )
        moved = True
        continue
      if moved:
        self._mngr.reload()
      return step, place(like, arrays), meta
    if moved:
      self._mngr.reload()
      if jax.process_index() == 0:
        log(
          f"no intact checkpoint left in {self.directory} (the damaged ones are in "
          f"{self.damaged_directory}); starting from step 0"
        )
    return None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step out of the manager's sight (process 0), then a barrier.

    Returns the new place of the step (on process 0; empty on the others).
    """
    target = ""
    if jax.process_index() == 0:
      root = epath.Path(self.damaged_directory)
      path, n = root / str(step), 1
      while path.exists():  # the same step damaged again after an earlier resume
        path, n = root / f"{step}.{n}", n + 1
      root.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(path)
      target = str(path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_{step}_moved_aside")
    return target

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def _agree(reason: str | None) -> str | None:
  """Every process's verdict on a step: damaged if any process found it so."""
  if jax.process_count() == 1:
    return reason
  flags = multihost_utils.process_allgather(np.int32(reason is not None))
  if reason is None and np.any(flags):
    return f"unreadable on process {int(np.argmax(flags))}"
  return reason
