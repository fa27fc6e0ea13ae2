"""Checks of user-given settings, outside ``jit``: one message style, "must be X; got: Y"."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_fn import _jaxpr


def _scalar(value: Any) -> Any:
  """A Python number for numpy/JAX scalars (``np.float32(0.1)``, ``jnp.float32(16)``)."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
    if _jaxpr.is_tracer(value):
      return value
    return np.asarray(value).item()
  return value


def positive_int(what: str, value: Any) -> int:
  value = _scalar(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{what} must be a positive int; got: {value!r}")
  return int(value)


def positive_number(what: str, value: Any, also: str = "") -> float:
  """A finite number > 0; ``also`` names other accepted values in the message."""
  value = _scalar(value)
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{what} must be a positive finite number{also}; got: {value!r}")
  return float(value)


def rate(what: str, value: Any) -> float:
  """A probability in ``[0, 1)``."""
  value = _scalar(value)
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not ok or not 0.0 <= value < 1.0:
    raise ValueError(f"{what} must be in [0, 1); got: {value!r}")
  return float(value)


def boolean(what: str, value: Any) -> bool:
  value = _scalar(value)
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{what} must be a bool; got: {value!r}")
  return bool(value)


def float_dtype(what: str, value: Any) -> Any:
  """``value`` as a float dtype; ``None`` passes through."""
  if value is None:
    return None
  if isinstance(value, (np.ndarray, jax.Array)):  # jnp.dtype(array) is its dtype: a mistake
    raise TypeError(f"{what} must be a float dtype; got an array of shape {np.shape(value)}")
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(f"{what} must be a float dtype; got: {value!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{what} must be a float dtype; got: {value!r}")
  return dtype


def prng_key(what: str, value: Any) -> Any:
  """One PRNG key: a typed key of shape ``()``, or a raw ``uint32`` key of the default PRNG."""
  dtype = getattr(value, "dtype", None)
  if dtype is not None:
    shape = np.shape(value)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if shape == ():
        return value
    elif np.dtype(dtype) == np.uint32 and shape == _raw_key_shape():
      return value
  got = (
    f"an array of shape {np.shape(value)} and dtype {dtype}" if dtype is not None else repr(value)
  )
  raise TypeError(f"{what} must be one PRNG key, e.g. jax.random.key(0); got: {got}")


def _raw_key_shape() -> tuple[int, ...]:
  """The shape of a raw ``uint32`` key of the default PRNG (``(2,)`` threefry, ``(4,)`` rbg)."""
  return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def two_arg_callable(what: str, fn: Callable[..., Any]) -> None:
  """Raises if ``fn`` cannot be called as ``fn(path, leaf)``."""
  try:
    inspect.signature(fn).bind("path", None)
  except TypeError as e:
    raise TypeError(f"{what} as a callable must accept (path, leaf); {e}") from e
  except ValueError:  # no signature (a builtin): let the call tell
    pass
