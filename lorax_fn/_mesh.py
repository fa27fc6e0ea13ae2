"""Device meshes: ``make_mesh`` from axis sizes, and the batch sharding over a mesh.

The weights' shardings over a mesh are :mod:`lorax_fn._shard`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "model")
"""Mesh axis names the built-in rules use: batch over ``data`` and ``fsdp``, weights over
``fsdp`` (and ``model`` for tensor parallelism)."""


def make_mesh(axes: str | Mapping[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A device mesh from axis sizes, one of them possibly ``-1`` (all remaining devices).

  Args:
    axes: ``"data=2,fsdp=4"``, ``{"data": 2, "fsdp": 4}`` or ``[("data", 2), ("fsdp", 4)]``;
      names from ``data``, ``fsdp`` and ``model``.
    devices: the devices (default: ``jax.devices()``, every process's).

  Returns:
    A :class:`~jax.sharding.Mesh` with ``Auto`` axes (sharding propagated by the compiler),
    in the topology-aware device order of :func:`jax.make_mesh`.

  Raises:
    ValueError: an unknown axis name, a size that is not a positive integer (or ``-1``), or
      sizes whose product is not the number of devices.

  Example:
    >>> import jax, lorax_fn as lora_fn
    >>> mesh = lora_fn.make_mesh("data=-1")
    >>> mesh.shape["data"] == jax.device_count()
    True
  """
  if isinstance(axes, str):
    pairs = []
    for part in filter(None, (p.strip() for p in axes.split(","))):
      name, eq, size = part.partition("=")
      if not eq or not size.strip().lstrip("-").isdigit():
        raise ValueError(f"mesh must look like 'data=2,fsdp=4'; got: {axes!r}")
      pairs.append((name.strip(), int(size)))
  elif isinstance(axes, Mapping):
    pairs = list(axes.items())
  elif isinstance(axes, Sequence) and all(
    isinstance(p, (tuple, list)) and len(p) == 2 for p in axes
  ):
    pairs = [tuple(p) for p in axes]
  else:
    raise TypeError(
      "mesh axes must be a string like 'data=2,fsdp=4', a mapping {'data': 2} or a sequence of "
      f"(name, size) pairs; got: {axes!r}"
    )
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must not be empty (None: every device)")
  names = [n for n, _ in pairs]
  unknown = [n for n in names if n not in AXES]
  if unknown or len(set(names)) != len(names) or not pairs:
    raise ValueError(
      f"mesh axes must be distinct names from {AXES}; got: {names} in {_show(pairs)}"
    )
  sizes = [s for _, s in pairs]
  bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
  if bad or any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive integers or -1; got: {_show(pairs)}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got: {_show(pairs)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"mesh {_show(pairs)}: {len(devices)} devices do not divide into the fixed axes ({known})"
      )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {_show(pairs)} has {math.prod(sizes)} devices, but there are {len(devices)}; "
      "make the sizes multiply to the device count, or give one axis -1"
    )
  return jax.make_mesh(
    tuple(int(s) for s in sizes),
    tuple(names),
    axis_types=(AxisType.Auto,) * len(names),  # keyword-only before JAX 0.7
    devices=devices,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches split on their leading axis over the mesh's ``data`` and ``fsdp`` axes.

  Example:
    >>> import jax, lorax_fn as lora_fn
    >>> tuple(lora_fn.batch_sharding(lora_fn.make_mesh("data=-1,fsdp=1")).spec)
    (('data', 'fsdp'),)
  """
  _check_mesh(mesh)
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if not axes:
    raise ValueError(
      f"the mesh has no 'data' or 'fsdp' axis (axes: {tuple(mesh.axis_names)}), so every device "
      "would get the whole batch; add a data axis, e.g. make_mesh('data=-1,model=2')"
    )
  return NamedSharding(mesh, PartitionSpec(axes))


def _check_mesh(mesh: Any) -> None:
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(
      f"mesh must be a jax.sharding.Mesh (or AbstractMesh), e.g. lorax_fn.make_mesh('data=-1'); "
      f"got: {mesh!r}"
    )


def _show(pairs: Sequence[tuple[str, int]]) -> str:
  return ",".join(f"{n}={s}" for n, s in pairs)
