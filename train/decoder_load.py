"""How each parameter of a :class:`decoder_model.Decoder` is read from a transformers checkpoint.

:func:`plan` checks a checkpoint's tensors against the parameters a configuration describes,
from the safetensors headers alone (and bitsandbytes' small quant-state blobs), and gives one
:class:`Leaf` per parameter: its path, its abstract value (to compute shardings before anything
is read) and a ``load`` that reads it. A float tensor is converted (``weight.T`` for a linear
layer); a targeted one is quantised as it is read, in PyTorch order for a kernel
(bitsandbytes' codes, a ``transposed`` ``QuantLeaf``); a bitsandbytes 4-bit weight is taken as
stored (``lorax_fn.from_bnb_4bit``). With scanned layers one leaf stacks every layer's tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from decoder_config import DecoderConfig
from decoder_names import abstract_params, torch_keys
from safetensors_io import Tensor, read_tensor

import lorax_fn as lora_fn

# bitsandbytes' per-weight statistics beside ``<module>.weight`` (Params4bit's state dict).
_BNB_STATE = ".quant_state.bitsandbytes__"
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DQ_BLOCK = 256  # block scales per block of double quantisation (bitsandbytes' nested_blocksize)
# Host pieces, in elements, that on-the-fly quantisation converts to float32 at a time.
_PIECE = 1 << 22


class Leaf(NamedTuple):
  """One leaf of the loaded params: its path, its abstract value and how to read it."""

  path: tuple[str, ...]
  abstract: Any  # jax.ShapeDtypeStruct, or a QuantLeaf of them
  load: Callable[[], Any]  # -> host arrays (or a QuantLeaf of them)


@dataclasses.dataclass(frozen=True)
class Options:
  """How to load: ``quantize`` kind (or None), its targets and settings, the float dtype."""

  quantize: str | None
  targets: Any
  block_size: int
  double_quant: bool
  dtype: Any  # of the float params and of what quantised ones dequantise to


def check_quantization_config(hf: Mapping[str, Any]) -> None:
  """Float and bitsandbytes 4-bit NF4 checkpoints pass; other quantisations are errors."""
  qc = hf.get("quantization_config")
  if not qc:
    return
  method = qc.get("quant_method", "bitsandbytes")
  if method != "bitsandbytes":
    raise ValueError(
      f"quantization_config has quant_method {method!r}, which is not supported; only "
      "bitsandbytes 4-bit NF4 checkpoints (and float ones) are read"
    )
  if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
    raise ValueError(
      "bitsandbytes 8-bit checkpoints (load_in_8bit) are not supported; load the float "
      "checkpoint with quantize='int8' instead"
    )
  quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' default is fp4
  if quant_type != "nf4":
    raise ValueError(
      f"bnb_4bit_quant_type {quant_type!r} is not supported: only 'nf4' bitsandbytes "
      "checkpoints are read (fp4 is not supported)"
    )


def plan(
  config: DecoderConfig, tensors: Mapping[str, Tensor], opts: Options
) -> tuple[list[Leaf], set[str]]:
  """Every leaf of the params ``config`` describes, checked against the checkpoint's tensors.

  Returns the leaves and the checkpoint keys they read. Nothing but headers (and the small
  bitsandbytes quant_state blobs) is read.
  """
  final = abstract_params(config)
  keys = torch_keys(abstract_params(dataclasses.replace(config, scan_layers=False)))
  flat = [(tuple(str(k.key) for k in p), x) for p, x in jax.tree_util.tree_leaves_with_path(final)]
  quantised = _targeted(final, opts) if opts.quantize else set()
  leaves, used = [], set()
  for path, aval in flat:
    stacked = path[0] == "layers"
    layer_keys = (
      [keys[(f"layers_{i}", *path[1:])] for i in range(config.num_hidden_layers)]
      if stacked
      else [keys[path]]
    )
    shape = aval.shape[1:] if stacked else aval.shape
    kernel = path[-1] == "kernel"
    torch_shape = tuple(shape[::-1] if kernel else shape)
    bnbs = [_bnb_weight(tensors, k) for k in layer_keys]
    if any(b is not None for b in bnbs):
      leaf = _bnb_leaf(path, aval, bnbs, layer_keys, torch_shape, kernel, opts, tensors)
      used.update(k for b in bnbs for k in b.used)
    else:
      for key in layer_keys:
        _check_tensor(tensors, key, torch_shape, path)
      make = _quantised_leaf if path in quantised else _float_leaf
      leaf = make(path, aval, [tensors[k] for k in layer_keys], kernel, opts)
      used.update(layer_keys)
    leaves.append(leaf)
  return leaves, used


def _targeted(params: Any, opts: Options) -> set[tuple[str, ...]]:
  """The paths ``quantize_targets`` selects: ``lorax_fn.quantize`` of the abstract params.

  Its selection and checks are those of quantising the loaded params; on shapes, it costs
  nothing.
  """
  settings = dict(block_size=opts.block_size, double_quant=opts.double_quant)
  out = lora_fn.quantize({"params": params}, opts.quantize, targets=opts.targets, **settings)
  flat = jax.tree_util.tree_leaves_with_path(out["params"], is_leaf=lora_fn.is_quant)
  return {tuple(str(k.key) for k in p) for p, x in flat if lora_fn.is_quant(x)}


def _abstract_quant(aval: Any, kind: str, **settings: Any) -> lora_fn.QuantLeaf:
  """The ``QuantLeaf`` of shapes only that quantising ``aval`` with ``settings`` gives."""
  return lora_fn.quantize({"w": aval}, kind, targets=("w",), **settings)["w"]


def _check_tensor(
  tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], path: tuple[str, ...]
) -> None:
  where = "params/" + "/".join(path)
  if key not in tensors:
    raise ValueError(f"the checkpoint has no tensor {key!r} (shape {shape}, for {where})")
  t = tensors[key]
  if t.shape != shape:
    raise ValueError(f"checkpoint tensor {key!r} has shape {t.shape}; the model expects {shape}")
  if t.dtype.kind not in "fV":  # V: bfloat16 and float8 (ml_dtypes)
    raise ValueError(f"checkpoint tensor {key!r} has dtype {t.dtype}; expected a float dtype")


def _float_leaf(
  path: tuple[str, ...], aval: Any, sources: Sequence[Tensor], kernel: bool, opts: Options
) -> Leaf:
  dtype = np.dtype(opts.dtype)

  def one(t: Tensor) -> np.ndarray:
    x = read_tensor(t)
    return (x.T if kernel else x).astype(dtype, copy=False)

  def load() -> np.ndarray:
    if len(sources) == 1 and path[0] != "layers":
      return one(sources[0])
    out = np.empty(aval.shape, dtype)
    for i, t in enumerate(sources):  # one layer's tensor at a time
      out[i] = one(t)
    return out

  return Leaf(path, jax.ShapeDtypeStruct(aval.shape, dtype), load)


def _quantised_leaf(
  path: tuple[str, ...], aval: Any, sources: Sequence[Tensor], kernel: bool, opts: Options
) -> Leaf:
  """Quantised as read, in PyTorch order for a kernel (bitsandbytes' codes), layer by layer."""
  settings = dict(block_size=opts.block_size, double_quant=opts.double_quant)

  def pieces() -> Iterator[np.ndarray]:
    for t in sources:
      flat = read_tensor(t).reshape(-1)
      for start in range(0, flat.size, _PIECE):
        yield flat[start : start + _PIECE]

  def load() -> lora_fn.QuantLeaf:
    return lora_fn.quantize_pieces(
      pieces(), opts.quantize, shape=aval.shape, dtype=opts.dtype, transposed=kernel, **settings
    )

  abstract = _abstract_quant(
    jax.ShapeDtypeStruct(aval.shape, opts.dtype), opts.quantize, torch_order=kernel, **settings
  )
  return Leaf(path, abstract, load)


# ------------------------------------------------------------------------------------------
# bitsandbytes 4-bit weights
# ------------------------------------------------------------------------------------------


class _Bnb(NamedTuple):
  """One bitsandbytes 4-bit weight: its key, quant_state and the checkpoint keys it reads."""

  key: str  # "<module>.weight"
  state: dict[str, Any]
  used: tuple[str, ...]

  @property
  def double_quant(self) -> bool:
    return "nested_blocksize" in self.state


def _bnb_weight(tensors: Mapping[str, Tensor], key: str) -> _Bnb | None:
  """The bitsandbytes weight stored under ``key``, or None for a plain tensor.

  Its tensors are checked as they are read (``lorax_fn.from_bnb_4bit``).

  Raises:
    ValueError: an fp4 weight.
  """
  if f"{key}{_BNB_STATE}fp4" in tensors:
    raise ValueError(f"{key!r} is a bitsandbytes fp4 weight; only nf4 is supported")
  state_key = f"{key}{_BNB_STATE}nf4"
  if state_key not in tensors:
    return None
  state = json.loads(bytes(read_tensor(tensors[state_key], np.uint8)).decode())
  names = _BNB_PARTS if "nested_blocksize" in state else _BNB_PARTS[:2]
  return _Bnb(key, state, (key, state_key, *(f"{key}.{n}" for n in names)))


class _Lazy(Mapping):
  """A checkpoint's tensors, each read when asked for (``from_bnb_4bit`` reads one weight's)."""

  def __init__(self, tensors: Mapping[str, Tensor]) -> None:
    self._tensors = tensors

  def __getitem__(self, key: str) -> np.ndarray:
    return read_tensor(self._tensors[key])

  def __contains__(self, key: object) -> bool:
    return key in self._tensors

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def _stack_bnb(layers: Sequence[lora_fn.QuantLeaf], per_layer_dq: bool) -> dict[str, Any]:
  """One stacked leaf's fields from its layers' (each quantised alone, whole blocks)."""
  cat = lambda name: np.concatenate([np.asarray(getattr(q, name)) for q in layers])
  if per_layer_dq:  # each layer's scales are whole blocks of 256: one offset per layer
    return dict(
      codes=cat("codes"),
      absmax=None,
      absmax_codes=cat("absmax_codes"),
      absmax_scale=cat("absmax_scale"),
      offset=np.stack([np.asarray(q.offset) for q in layers]),
    )
  # Double-quantised scales that do not align are decoded exactly, as bitsandbytes does
  # (op by op: no fused multiply-add), to float32 scales.
  absmax = np.concatenate([np.asarray(q.scales()) for q in layers])
  return dict(codes=cat("codes"), absmax=absmax, absmax_codes=None, absmax_scale=None, offset=None)


def _check_bnb_stack(
  path: tuple[str, ...],
  bnbs: Sequence[_Bnb | None],
  keys: Sequence[str],
  torch_shape: tuple[int, ...],
  kernel: bool,
  opts: Options,
) -> None:
  """The layers' weights are all bitsandbytes NF4, of the kernel's shape, stored alike."""
  if any(b is None for b in bnbs):
    plain = [k for k, b in zip(keys, bnbs, strict=True) if b is None]
    raise ValueError(
      f"{plain[:3]} are float, the other layers' {path[-2]} bitsandbytes-quantised: they "
      "cannot be stacked; load with scan_layers=False"
    )
  if not kernel:
    raise ValueError(
      f"{keys[0]!r} is bitsandbytes-quantised, but params/{'/'.join(path)} is no kernel"
    )
  for b in bnbs:
    if tuple(b.state["shape"]) != torch_shape:
      raise ValueError(
        f"checkpoint tensor {b.key!r} has (quantised) shape {tuple(b.state['shape'])}; the model "
        f"expects {torch_shape}"
      )
  if opts.quantize not in (None, "nf4"):
    raise ValueError(
      f"the checkpoint is bitsandbytes NF4 ({bnbs[0].key!r}); quantize={opts.quantize!r} cannot "
      "apply to it: pass quantize=None or 'nf4'"
    )
  first = bnbs[0]
  if any(b.state["blocksize"] != first.state["blocksize"] for b in bnbs) or any(
    b.double_quant != first.double_quant for b in bnbs
  ):
    raise ValueError(
      f"the layers' {path[-2]} are quantised with different block sizes or double "
      "quantisation: they cannot be stacked; load with scan_layers=False"
    )


def _bnb_leaf(
  path: tuple[str, ...],
  aval: Any,
  bnbs: Sequence[_Bnb | None],
  keys: Sequence[str],
  torch_shape: tuple[int, ...],
  kernel: bool,
  opts: Options,
  tensors: Mapping[str, Tensor],
) -> Leaf:
  """A bitsandbytes weight (or a stack of them) as one transposed NF4 ``QuantLeaf``."""
  _check_bnb_stack(path, bnbs, keys, torch_shape, kernel, opts)
  block_size, dq = bnbs[0].state["blocksize"], bnbs[0].double_quant
  n = math.prod(torch_shape)
  stacked = path[0] == "layers"
  if stacked and (n % block_size or n % 2):
    raise ValueError(
      f"{keys[0]!r} has {n} values, not whole blocks of {block_size}: its layers cannot be "
      "stacked; load with scan_layers=False"
    )
  per_layer_dq = stacked and dq and (n // block_size) % _DQ_BLOCK == 0

  def load() -> lora_fn.QuantLeaf:
    lazy = _Lazy(tensors)
    layers = [lora_fn.from_bnb_4bit(lazy, prefix=b.key, dtype=opts.dtype) for b in bnbs]
    if not stacked:
      return layers[0]
    return lora_fn.QuantLeaf(
      **_stack_bnb(layers, per_layer_dq),
      kind="nf4",
      shape=aval.shape,
      dtype_name=np.dtype(opts.dtype).name,
      block_size=block_size,
      transposed=True,
    )

  abstract = _abstract_quant(
    jax.ShapeDtypeStruct(aval.shape, opts.dtype),
    "nf4",
    block_size=block_size,
    double_quant=dq and (per_layer_dq or not stacked),  # else decoded to float32 scales
    torch_order=True,
  )
  if per_layer_dq:
    abstract = dataclasses.replace(abstract, offset=jax.ShapeDtypeStruct((len(bnbs),), jnp.float32))
  return Leaf(path, abstract, load)
