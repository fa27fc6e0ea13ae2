"""Hugging Face decoder checkpoints (Llama family, Qwen2) <-> :class:`Decoder` parameters.

:func:`load_hf_decoder` reads a transformers checkpoint directory (one ``model.safetensors`` or
shards with ``model.safetensors.index.json``) tensor by tensor: each tensor is converted
(``weight.T`` for a linear layer), quantised on the fly if targeted (NF4 in PyTorch order:
bitsandbytes' codes, in a ``transposed`` ``QuantLeaf``) and placed on the mesh before the next
is read, so host memory holds about one tensor besides the loaded model. A bitsandbytes 4-bit
checkpoint (a ``-bnb-4bit`` repo) loads straight into ``QuantLeaf`` s, its codes and scales as
stored, decoding bit for bit as bitsandbytes does. :func:`save_hf_decoder` writes a directory
transformers' ``AutoModelForCausalLM.from_pretrained`` loads (LoRA merged, dequantised).

The model, its configuration and :func:`generate` live in ``decoder_model`` and are re-exported
here, so callers import this one module.

The safetensors files are read by a small reader of the documented format (an 8-byte header
length, a JSON header of dtypes, shapes and byte offsets, then the raw little-endian data):
``safetensors``' numpy backend cannot return bfloat16, and reading byte ranges keeps one tensor
in memory at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from decoder_model import (
  ARCHITECTURES,
  Decoder,
  DecoderConfig,
  generate,
  stack_layers,
  torch_keys,
  unstack_layers,
)
from errors import HubUnreachable
from jax.sharding import Mesh, NamedSharding

import lorax_fn as lora_fn
from lorax_fn import _paths, _quant, _shard

__all__ = [
  "LINEAR_TARGETS",
  "Decoder",
  "DecoderConfig",
  "generate",
  "hf_config",
  "load_hf_decoder",
  "resolve_checkpoint",
  "save_hf_decoder",
  "stack_layers",
  "unstack_layers",
]

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear kernels of every decoder layer: what QLoRA quantises (and adapts)."""

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
_KINDS = ("nf4", "int4", "int8")
# Tensors a checkpoint may hold that no parameter stands for (older Llama files saved them).
_HARMLESS = re.compile(r"(.*\.)?rotary_emb\.inv_freq$")
# bitsandbytes' per-weight statistics beside ``<module>.weight`` (Params4bit's state dict).
_BNB_STATE = ".quant_state.bitsandbytes__"
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a decoder repo needs besides the weights: configs, tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "chat_template.jinja",
  "chat_template.json",
  "generation_config.json",
)
# Host pieces, in elements, that on-the-fly quantisation converts to float32 at a time.
_PIECE = 1 << 22

# ------------------------------------------------------------------------------------------
# safetensors, tensor by tensor
# ------------------------------------------------------------------------------------------

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64),
  "U32": np.dtype(np.uint32),
  "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class Tensor(NamedTuple):
  """Where one tensor of a safetensors file lies (read by :func:`read_tensor`)."""

  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # byte offset in the file
  nbytes: int


def read_header(file: str) -> dict[str, Tensor]:
  """The tensors of one safetensors file, from its header alone (no data is read).

  Raises:
    ValueError: a file that is not safetensors, an unknown dtype or inconsistent offsets.
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
      raise ValueError(f"{file!r} is not a safetensors file (header length {n})")
    header = json.loads(f.read(n))
  tensors = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"tensor {key!r} in {file!r} has dtype {info['dtype']}, which is not read")
    dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise ValueError(f"tensor {key!r} in {file!r} has offsets that do not fit its shape")
    tensors[key] = Tensor(file, dtype, shape, 8 + n + begin, end - begin)
  return tensors


def read_tensor(tensor: Tensor, dtype: Any = None) -> np.ndarray:
  """The tensor's data: its bytes read straight into a new array (viewed as ``dtype``)."""
  out = np.empty(tensor.shape, tensor.dtype)
  with open(tensor.file, "rb") as f:
    f.seek(tensor.start)
    if f.readinto(out.reshape(-1).view(np.uint8)) != tensor.nbytes:
      raise ValueError(f"{tensor.file!r} ends inside a tensor")
  return out if dtype is None else out.view(dtype)


def _write_safetensors(file: str, tensors: Sequence[tuple[str, Any]], fetch: Callable) -> None:
  """Writes ``(key, abstract)`` tensors in order, ``fetch(key)`` giving each one's data then."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks "pt"
  offset = 0
  for key, aval in tensors:
    dtype = np.dtype(aval.dtype)
    end = offset + math.prod(aval.shape) * dtype.itemsize
    header[key] = {"dtype": _NAMES[dtype], "shape": list(aval.shape), "data_offsets": [offset, end]}
    offset = end
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for key, aval in tensors:
      data = np.ascontiguousarray(fetch(key), np.dtype(aval.dtype))
      assert data.shape == tuple(aval.shape), (key, data.shape, aval.shape)
      f.write(data.reshape(-1).view(np.uint8).data)


# ------------------------------------------------------------------------------------------
# Finding the checkpoint
# ------------------------------------------------------------------------------------------


def resolve_checkpoint(source: str | os.PathLike) -> str:
  """The local directory of a checkpoint: ``source`` itself, or a hub repo id downloaded.

  Args:
    source: a directory with ``config.json`` and the safetensors weights, or a hub repo id
      such as ``Qwen/Qwen2-0.5B-Instruct`` (config, weights and tokenizer files are fetched).

  Returns:
    The directory.

  Raises:
    HubUnreachable: a repo id that cannot be fetched (offline or unreachable hub).
    FileNotFoundError: neither a directory nor a repo id.
  """
  source = os.fspath(source)
  if os.path.isdir(source):
    return source
  if not _REPO_ID.match(source) or os.path.exists(source):
    raise FileNotFoundError(f"no checkpoint directory at {source!r}")
  import huggingface_hub
  from huggingface_hub import constants

  # HF_HUB_OFFLINE is read at import only; honour a later setting so offline runs fail fast.
  flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
  try:
    return huggingface_hub.snapshot_download(
      source,
      allow_patterns=_HUB_PATTERNS,
      local_files_only=constants.is_offline_mode() or flag,
    )
  except Exception as err:  # hub, HTTP and offline errors share no common base class
    raise HubUnreachable(
      f"cannot fetch {source!r}: the Hugging Face hub is unreachable or offline ({err}). Pass "
      f"a local directory with {_CONFIG} and {_WEIGHTS} (or its shards) instead."
    ) from err


def _weight_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint directory: one file, or the shards of the index."""
  single, index = os.path.join(directory, _WEIGHTS), os.path.join(directory, _SHARD_INDEX)
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
      raise FileNotFoundError(f"{_SHARD_INDEX} in {directory!r} names missing shards {missing}")
    return [os.path.join(directory, s) for s in shards]
  raise FileNotFoundError(f"{directory!r} has neither {_WEIGHTS} nor {_SHARD_INDEX}")


def _read_index(files: Sequence[str]) -> dict[str, Tensor]:
  tensors: dict[str, Tensor] = {}
  for file in files:
    for key, t in read_header(file).items():
      if key in tensors:
        raise ValueError(f"tensor {key!r} is in both {tensors[key].file!r} and {file!r}")
      tensors[key] = t
  return tensors


# ------------------------------------------------------------------------------------------
# bitsandbytes 4-bit weights
# ------------------------------------------------------------------------------------------


def _check_quantization_config(hf: Mapping[str, Any]) -> None:
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


class _Bnb(NamedTuple):
  """One bitsandbytes 4-bit weight: its quant_state and its tensors."""

  key: str  # "<module>.weight"
  state: dict[str, Any]
  parts: dict[str, Tensor]  # "weight", "absmax", ... -> where it lies
  used: tuple[str, ...]  # every checkpoint key it is read from

  @property
  def double_quant(self) -> bool:
    return "nested_blocksize" in self.state


def _bnb_weight(tensors: Mapping[str, Tensor], key: str) -> _Bnb | None:
  """The bitsandbytes weight stored under ``key``, or None for a plain tensor.

  Raises:
    ValueError: an fp4 weight, a missing statistic or statistics that do not fit the codes.
  """
  if f"{key}{_BNB_STATE}fp4" in tensors:
    raise ValueError(f"{key!r} is a bitsandbytes fp4 weight; only nf4 is supported")
  state_key = f"{key}{_BNB_STATE}nf4"
  if state_key not in tensors:
    return None
  state = json.loads(bytes(read_tensor(tensors[state_key], np.uint8)).decode())
  names = _BNB_PARTS if "nested_blocksize" in state else _BNB_PARTS[:2]
  if key not in tensors:
    raise ValueError(f"the checkpoint has {state_key!r} but no tensor {key!r} (the codes)")
  parts = {"weight": tensors[key]}
  for name in names:
    if f"{key}.{name}" not in tensors:
      raise ValueError(f"the bitsandbytes weight {key!r} has no {key}.{name} tensor")
    parts[name] = tensors[f"{key}.{name}"]
  b = _Bnb(key, state, parts, (key, state_key, *(f"{key}.{n}" for n in names)))
  _check_bnb(b)
  return b


def _check_bnb(b: _Bnb) -> None:
  """The statistics fit the codes, and the code tables are bitsandbytes' NF4 and dynamic."""
  s = b.state
  if s.get("quant_type") != "nf4":
    raise ValueError(f"{b.key!r} has quant_type {s.get('quant_type')!r}; only nf4 is supported")
  n = math.prod(s["shape"])
  blocks = -(-n // s["blocksize"])
  sizes = {"weight": -(-n // 2), "absmax": blocks}
  if b.double_quant:
    if s["nested_blocksize"] != _quant.DQ_BLOCK:
      raise ValueError(f"{b.key!r} has nested_blocksize {s['nested_blocksize']}; expected 256")
    sizes["nested_absmax"] = -(-blocks // _quant.DQ_BLOCK)
  for name, size in sizes.items():
    if b.parts[name].nbytes // b.parts[name].dtype.itemsize != size:
      raise ValueError(
        f"{b.key}.{name} holds {b.parts[name].shape} values; {size} fit the quantised shape "
        f"{tuple(s['shape'])} in blocks of {s['blocksize']}"
      )
  _same_table(b, "quant_map", _quant.NF4_CODE)
  if b.double_quant:
    _same_table(b, "nested_quant_map", _quant.dynamic_code())


def _same_table(b: _Bnb, name: str, table: np.ndarray) -> None:
  got = read_tensor(b.parts[name]).astype(np.float32).reshape(-1)
  if got.shape != table.shape or not np.array_equal(got.view(np.uint32), table.view(np.uint32)):
    raise ValueError(
      f"{b.key}.{name} is not bitsandbytes' {'NF4' if name == 'quant_map' else 'dynamic'} "
      "code table; this checkpoint's quantisation cannot be decoded"
    )


def _bnb_fields(b: _Bnb) -> dict[str, Any]:
  """One weight's codes and scales as ``QuantLeaf`` fields, as stored (host arrays)."""
  codes = read_tensor(b.parts["weight"], np.uint8).reshape(-1)  # any quant_storage: its bytes
  if not b.double_quant:
    absmax = read_tensor(b.parts["absmax"]).astype(np.float32).reshape(-1)
    return dict(codes=codes, absmax=absmax, absmax_codes=None, absmax_scale=None, offset=None)
  return dict(
    codes=codes,
    absmax=None,
    absmax_codes=read_tensor(b.parts["absmax"], np.uint8).reshape(-1),
    absmax_scale=read_tensor(b.parts["nested_absmax"]).astype(np.float32).reshape(-1),
    offset=np.float32(b.state["nested_offset"]),
  )


def _decoded_scales(fields: Mapping[str, Any]) -> np.ndarray:
  """bitsandbytes' float32 block scales: ``code2[q] * absmax2`` rounded, then ``+ offset``."""
  q, a2 = fields["absmax_codes"], fields["absmax_scale"]
  per = np.repeat(a2, _quant.DQ_BLOCK)[: q.size]
  return (_quant.dynamic_code()[q] * per).astype(np.float32) + fields["offset"]


def _stack_bnb(layers: Sequence[dict[str, Any]], per_layer_dq: bool) -> dict[str, Any]:
  """One stacked leaf's fields from its layers' (each quantised alone, whole blocks)."""
  cat = lambda name: np.concatenate([f[name] for f in layers])
  if per_layer_dq:  # each layer's scales are whole blocks of 256: one offset per layer
    return dict(
      codes=cat("codes"),
      absmax=None,
      absmax_codes=cat("absmax_codes"),
      absmax_scale=cat("absmax_scale"),
      offset=np.stack([f["offset"] for f in layers]),
    )
  if layers[0]["absmax"] is None:  # double-quantised scales that do not align: decoded exactly
    layers = [dict(f, absmax=_decoded_scales(f)) for f in layers]
  return dict(
    codes=cat("codes"), absmax=cat("absmax"), absmax_codes=None, absmax_scale=None, offset=None
  )


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


class _Leaf(NamedTuple):
  """One leaf of the loaded params: its path, its abstract value and how to read it."""

  path: tuple[str, ...]
  abstract: Any  # jax.ShapeDtypeStruct, or a QuantLeaf of them
  load: Callable[[], Any]  # -> host arrays (or a QuantLeaf of them)


def _abstract_params(config: DecoderConfig) -> Any:
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(Decoder(config).init, jax.random.key(0), ids)["params"]


@dataclasses.dataclass(frozen=True)
class _Options:
  quantize: str | None
  targets: Any
  block_size: int
  double_quant: bool
  dtype: Any  # of the float params and of what quantised ones dequantise to


def _plan(
  config: DecoderConfig, tensors: Mapping[str, Tensor], opts: _Options
) -> tuple[list[_Leaf], set[str]]:
  """Every leaf of the params ``config`` describes, checked against the checkpoint's tensors.

  Returns the leaves and the checkpoint keys they read. Nothing but headers (and the small
  bitsandbytes quant_state blobs and code tables) is read.
  """
  final = _abstract_params(config)
  keys = torch_keys(_abstract_params(dataclasses.replace(config, scan_layers=False)))
  flat = [(tuple(str(k.key) for k in p), x) for p, x in jax.tree_util.tree_leaves_with_path(final)]
  quantised = _targeted(flat, opts) if opts.quantize else set()
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
      leaf = _bnb_leaf(path, aval, bnbs, layer_keys, torch_shape, kernel, opts)
      used.update(k for b in bnbs for k in b.used)
    else:
      for key in layer_keys:
        _check_tensor(tensors, key, torch_shape, path)
      make = _quantised_leaf if path in quantised else _float_leaf
      leaf = make(path, aval, [tensors[k] for k in layer_keys], kernel, opts)
      used.update(layer_keys)
    leaves.append(leaf)
  return leaves, used


def _targeted(flat: Sequence[tuple[tuple[str, ...], Any]], opts: _Options) -> set[tuple[str, ...]]:
  """The paths ``quantize_targets`` selects, as ``lorax_fn.quantize`` would select them."""
  paths = ["/".join(("params", *p)) for p, _ in flat]
  hits = _paths.select(opts.targets, paths, [x for _, x in flat])
  for i in hits:
    if len(flat[i][1].shape) < 2:
      raise ValueError(f"quantize_targets selects {paths[i]!r}, which is not a kernel")
  return {flat[i][0] for i in hits}


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
  path: tuple[str, ...], aval: Any, sources: Sequence[Tensor], kernel: bool, opts: _Options
) -> _Leaf:
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

  return _Leaf(path, jax.ShapeDtypeStruct(aval.shape, dtype), load)


def _quantised_leaf(
  path: tuple[str, ...], aval: Any, sources: Sequence[Tensor], kernel: bool, opts: _Options
) -> _Leaf:
  """Quantised as read, in PyTorch order for a kernel (bitsandbytes' codes), layer by layer."""

  def pieces() -> Iterator[np.ndarray]:
    for t in sources:
      flat = read_tensor(t).reshape(-1)
      for start in range(0, flat.size, _PIECE):
        yield flat[start : start + _PIECE]

  def load() -> lora_fn.QuantLeaf:
    return _quant.quantize_pieces(
      pieces(),
      opts.quantize,
      shape=aval.shape,
      dtype=opts.dtype,
      block_size=opts.block_size,
      double_quant=opts.double_quant,
      transposed=kernel,
    )

  abstract = _quant.abstract_quant(
    jax.ShapeDtypeStruct(aval.shape, opts.dtype),
    opts.quantize,
    block_size=opts.block_size,
    double_quant=opts.double_quant,
    torch_order=kernel,
  )
  return _Leaf(path, abstract, load)


def _bnb_leaf(
  path: tuple[str, ...],
  aval: Any,
  bnbs: Sequence[_Bnb | None],
  keys: Sequence[str],
  torch_shape: tuple[int, ...],
  kernel: bool,
  opts: _Options,
) -> _Leaf:
  """A bitsandbytes weight (or a stack of them) as one transposed NF4 ``QuantLeaf``."""
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
  block_size = bnbs[0].state["blocksize"]
  dq = bnbs[0].double_quant
  if any(b.state["blocksize"] != block_size or b.double_quant != dq for b in bnbs):
    raise ValueError(
      f"the layers' {path[-2]} are quantised with different block sizes or double "
      "quantisation: they cannot be stacked; load with scan_layers=False"
    )
  n = math.prod(torch_shape)
  stacked = path[0] == "layers"
  if stacked and (n % block_size or n % 2):
    raise ValueError(
      f"{keys[0]!r} has {n} values, not whole blocks of {block_size}: its layers cannot be "
      "stacked; load with scan_layers=False"
    )
  per_layer_dq = stacked and dq and (n // block_size) % _quant.DQ_BLOCK == 0

  def load() -> lora_fn.QuantLeaf:
    layers = [_bnb_fields(b) for b in bnbs]
    fields = _stack_bnb(layers, per_layer_dq) if stacked else layers[0]
    return lora_fn.QuantLeaf(
      **fields,
      kind="nf4",
      shape=aval.shape,
      dtype_name=np.dtype(opts.dtype).name,
      block_size=block_size,
      transposed=True,
    )

  abstract = _quant.abstract_quant(
    jax.ShapeDtypeStruct(aval.shape, opts.dtype),
    "nf4",
    block_size=block_size,
    double_quant=dq and (per_layer_dq or not stacked),  # else decoded to float32 scales
    torch_order=True,
  )
  if per_layer_dq:
    abstract = dataclasses.replace(abstract, offset=jax.ShapeDtypeStruct((len(bnbs),), jnp.float32))
  return _Leaf(path, abstract, load)


def _param_dtype(param_dtype: Any, hf: Mapping[str, Any]) -> np.dtype:
  """``param_dtype``, or the checkpoint's own (config.json ``dtype``/``torch_dtype``)."""
  if param_dtype is not None:
    dtype = jnp.dtype(param_dtype)
  else:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = jnp.dtype(name)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"param_dtype must be a float dtype; got: {dtype}")
  return np.dtype(dtype)


def _check_options(quantize: Any, block_size: Any, double_quant: Any) -> None:
  if quantize is not None and quantize not in _KINDS:
    raise ValueError(f"quantize must be None or one of {_KINDS}; got: {quantize!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive power of two; got: {block_size!r}")
  if block_size & (block_size - 1):
    raise ValueError(f"block_size must be a positive power of two; got: {block_size!r}")
  if not isinstance(double_quant, bool):
    raise TypeError(f"double_quant must be a bool; got: {double_quant!r}")


def _shardings(leaves: Sequence[_Leaf], mesh: Mesh | None, rules: Any) -> list[Any]:
  """Each leaf's sharding: from ``lorax_fn.partition_specs`` over the whole (abstract) params."""
  if mesh is None:
    return [None] * len(leaves)
  tree: dict = {}
  for leaf in leaves:
    _set(tree, leaf.path, leaf.abstract)
  specs = lora_fn.partition_specs({"params": tree}, rules, mesh=mesh)["params"]
  is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
  named = jax.tree.map(
    lambda s: None if s is None else NamedSharding(mesh, s), specs, is_leaf=is_spec
  )
  return [_get(named, leaf.path) for leaf in leaves]


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Any, path: Sequence[str]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def load_hf_decoder(
  path: str | os.PathLike,
  *,
  quantize: str | None = None,
  quantize_targets: Any = LINEAR_TARGETS,
  double_quant: bool = True,
  block_size: int = 64,
  dtype: Any = None,
  param_dtype: Any = None,
  scan_layers: bool = False,
  remat: bool = False,
  mesh: Mesh | None = None,
  rules: Any = "fsdp",
) -> tuple[Decoder, dict]:
  """Loads a Hugging Face Llama-family or Qwen2 checkpoint, tensor by tensor.

  Each tensor is read from its safetensors file, converted (a linear ``weight`` becomes the
  kernel ``weight.T``; names as :func:`decoder_model.torch_keys` gives them), quantised if
  targeted, and placed on ``mesh`` (or the default device) before the next is read: host
  memory holds about one tensor (with ``scan_layers``, one stacked parameter) besides the
  model. Quantised kernels are NF4 (int4, int8) in PyTorch's ``(out, in)`` order, so their
  codes and scales are bitsandbytes' for the same weight (block scales double-quantised with
  the exact nearest code, where bitsandbytes' CPU kernel may round one step off); the
  ``QuantLeaf`` is ``transposed`` and dequantises to the ``(in, out)`` kernel.

  A bitsandbytes 4-bit checkpoint (``quantization_config`` with ``load_in_4bit``, NF4, with
  or without double quantisation: a ``-bnb-4bit`` repo) loads its quantised weights into
  ``QuantLeaf`` s as stored, without dequantising; they decode bit for bit as bitsandbytes'
  ``dequantize_4bit`` (transposed). Its own block size and double quantisation apply. With
  ``scan_layers`` the layers' codes are concatenated; their double-quantised scales too when
  each layer's are whole blocks of 256 (one offset per layer), else decoded exactly to float32
  block scales.

  Apply a model with quantised leaves through ``lorax_fn.lora(model.apply)``.

  Args:
    path: a checkpoint directory (``config.json`` and ``model.safetensors``, or shards and
      ``model.safetensors.index.json``) or a hub repo id (see :func:`resolve_checkpoint`).
    quantize: ``"nf4"``, ``"int4"``, ``"int8"`` or None (float kernels).
    quantize_targets: which parameters to quantise, as ``targets`` of ``lorax_fn.quantize``
      over the returned variables (default: the seven linear kernels of every layer).
    double_quant: quantise the block scales too (bitsandbytes' ``compress_statistics``).
    block_size: elements per quantisation block; a power of two.
    dtype: the compute dtype (``DecoderConfig.dtype``); None: float32.
    param_dtype: dtype of the float parameters and of what quantised kernels dequantise to;
      None: the checkpoint's (config.json ``dtype``).
    scan_layers: one ``layers`` subtree with a leading layer axis (``nn.scan``).
    remat: rematerialise each layer in the backward pass.
    mesh: place every leaf on this mesh, sharded by ``rules``; None: the default device.
    rules: ``rules`` of ``lorax_fn.partition_specs`` over the returned variables.

  Returns:
    ``(model, {"params": params})``.

  Raises:
    ValueError: an unsupported architecture or quantisation (named), a missing tensor or one
      of the wrong shape (its checkpoint key and both shapes named), tensors the model does
      not have (named), or a bad option.
    FileNotFoundError: no checkpoint at ``path``.
    HubUnreachable: a repo id that cannot be fetched.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp
    >>> c = DecoderConfig(11, 64, 128, 1, 2, 1, head_dim=32)
    >>> model = Decoder(c)
    >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> with tempfile.TemporaryDirectory() as d:  # overwrite: d exists already
    ...   save_hf_decoder(d, model, variables, overwrite=True)
    ...   model, loaded = load_hf_decoder(d, quantize="nf4")
    >>> q = loaded["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    >>> q.shape, q.stored_shape, q.transposed  # logits: lora_fn.lora(model.apply)(loaded, ids)
    ((64, 128), (128, 64), True)
  """
  _check_options(quantize, block_size, double_quant)
  directory = resolve_checkpoint(path)
  config_path = os.path.join(directory, _CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{_CONFIG} not found in {directory!r}")
  with open(config_path) as f:
    hf = json.load(f)
  _check_quantization_config(hf)
  pdtype = _param_dtype(param_dtype, hf)
  options = dict(param_dtype=pdtype, scan_layers=scan_layers, remat=remat)
  config = DecoderConfig.from_hf(hf, **options, **({} if dtype is None else dict(dtype=dtype)))
  tensors = _read_index(_weight_files(directory))
  opts = _Options(quantize, quantize_targets, block_size, double_quant, pdtype)
  leaves, used = _plan(config, tensors, opts)
  ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
  extra = sorted(k for k in tensors.keys() - used - ignored if not _HARMLESS.match(k))
  if extra:
    raise ValueError(
      f"the checkpoint has {len(extra)} tensors the {config.model_type} model does not: {extra[:8]}"
    )
  params: dict = {}
  for leaf, sharding in zip(leaves, _shardings(leaves, mesh, rules), strict=True):
    value = leaf.load()
    _set(
      params,
      leaf.path,
      jax.device_put(value) if sharding is None else _shard.place(value, sharding),
    )
    del value  # the host copy goes before the next tensor is read
  return Decoder(config), {"params": params}


# ------------------------------------------------------------------------------------------
# Export: a transformers checkpoint
# ------------------------------------------------------------------------------------------


def hf_config(config: DecoderConfig, *, base: Mapping[str, Any] | None = None) -> dict:
  """The transformers ``config.json`` of a model computing what ``config`` describes.

  Args:
    config: the architecture.
    base: a ``config.json`` to start from (token ids, generation settings, ...); its
      architecture fields are replaced, its ``quantization_config`` dropped.

  Returns:
    The dict; ``DecoderConfig.from_hf`` of it equals ``config`` (compute options aside).

  Raises:
    ValueError: a configuration transformers cannot express (e.g. a Llama output bias
      without q/k/v bias, or Qwen2 without q/k/v bias).

  Example:
    >>> c = DecoderConfig(11, 8, 12, 2, 2, 1, head_dim=4, model_type="qwen2",
    ...                   attention_bias=True, tie_word_embeddings=True)
    >>> hf = hf_config(c)
    >>> hf["architectures"], hf["tie_word_embeddings"], hf["rope_parameters"]
    (['Qwen2ForCausalLM'], True, {'rope_type': 'default', 'rope_theta': 10000.0})
    >>> DecoderConfig.from_hf(hf) == c
    True
  """
  qwen2 = config.model_type == "qwen2"
  if qwen2 and (not config.attention_bias or config.o_proj_bias or config.mlp_bias):
    raise ValueError("a Qwen2 model has q/k/v biases and no output or MLP bias; got others")
  if not qwen2 and config.attention_bias != config.o_proj_bias:
    raise ValueError("a Llama model has biases on all of q/k/v/o or on none; got others")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
  if config.rope_scaling is not None:
    rope.update(rope_type="llama3", **dataclasses.asdict(config.rope_scaling))
  out = {k: v for k, v in (base or {}).items() if k not in ("quantization_config", "torch_dtype")}
  out.update(
    architectures=[ARCHITECTURES[config.model_type]],
    model_type=config.model_type,
    vocab_size=config.vocab_size,
    hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size,
    num_hidden_layers=config.num_hidden_layers,
    num_attention_heads=config.num_attention_heads,
    num_key_value_heads=config.num_key_value_heads,
    head_dim=config.head_dim,
    hidden_act="silu",
    rms_norm_eps=config.rms_norm_eps,
    rope_parameters=rope,
    tie_word_embeddings=config.tie_word_embeddings,
    max_position_embeddings=config.max_position_embeddings,
    dtype=jnp.dtype(config.param_dtype).name,
  )
  for key in ("rope_scaling", "rope_theta", "use_sliding_window"):
    out.pop(key, None)  # rope_parameters says it all (transformers 5)
  if not qwen2:
    out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
  return out


def _is_node(x: Any) -> bool:
  return lora_fn.is_lora(x) or lora_fn.is_quant(x) or lora_fn.is_stack(x)


def _export_plan(
  config: DecoderConfig, params: Any
) -> tuple[list[tuple[str, Any]], dict[str, tuple[int, int | None, bool]], list[Any]]:
  """Torch keys with abstract tensors, where each comes from, and the leaves (unmerged).

  Raises:
    ValueError: ``params`` do not have the model's paths and shapes (the differences named).
  """
  expected = {
    tuple(str(k.key) for k in p): x
    for p, x in jax.tree_util.tree_leaves_with_path(_abstract_params(config))
  }
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)[0]
  got = {tuple(str(getattr(k, "key", k)) for k in p): x for p, x in flat}
  missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
  bad = [(p, tuple(got[p].shape)) for p in expected.keys() & got.keys()]
  bad = [(p, s) for p, s in bad if s != tuple(expected[p].shape)]
  if missing or extra or bad:
    raise ValueError(
      f"params do not fit the model ({'scanned' if config.scan_layers else 'unrolled'}, "
      f"{config.num_hidden_layers} layers): missing {['/'.join(p) for p in missing][:6]}, "
      f"unexpected {['/'.join(p) for p in extra][:6]}, shapes {bad[:4]}"
    )
  keys = torch_keys(_abstract_params(dataclasses.replace(config, scan_layers=False)))
  tensors, source, leaves = [], {}, []
  for i, (path, x) in enumerate(got.items()):
    aval = jax.eval_shape(_merged, x) if _is_node(x) else jax.ShapeDtypeStruct(x.shape, x.dtype)
    leaves.append(x)
    layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
    for layer in layers:
      key = keys[path if layer is None else (f"layers_{layer}", *path[1:])]
      shape = aval.shape if layer is None else aval.shape[1:]
      kernel = path[-1] == "kernel"
      tensors.append((key, jax.ShapeDtypeStruct(shape[::-1] if kernel else shape, aval.dtype)))
      source[key] = (i, layer, kernel)
  return tensors, source, leaves


def _merged(x: Any) -> jax.Array:
  """A LoRA leaf merged (``W + s·BA``, the base dequantised) or a quantised one dequantised."""
  if lora_fn.is_stack(x):
    raise ValueError("params hold a stack of adapters; merge one: lora_fn.unstack_adapter")
  return _merge_jit(x)


# Compiled once per kind of leaf (and shape): faster than op by op, one leaf on device at a time.
_merge_jit = jax.jit(lambda x: lora_fn.merge({"leaf": x})["leaf"])


def _shards(tensors: Sequence[tuple[str, Any]], max_bytes: int | None) -> list[list]:
  """Consecutive groups of tensors of at most ``max_bytes`` each (a bigger tensor alone)."""
  groups: list[list] = [[]]
  size = 0
  for key, aval in tensors:
    nbytes = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    if max_bytes is not None and groups[-1] and size + nbytes > max_bytes:
      groups.append([])
      size = 0
    groups[-1].append((key, aval))
    size += nbytes
  return groups


def save_hf_decoder(
  path: str | os.PathLike,
  model: Decoder,
  variables: Mapping[str, Any],
  *,
  base_config: Mapping[str, Any] | None = None,
  tokenizer_from: str | os.PathLike | None = None,
  max_shard_size: int | None = None,
  overwrite: bool = False,
) -> None:
  """Writes ``variables["params"]`` as a transformers checkpoint directory.

  ``config.json`` comes from ``model.config`` (:func:`hf_config`) and the weights go to
  ``model.safetensors`` (or shards of at most ``max_shard_size`` bytes with
  ``model.safetensors.index.json``) under PyTorch's names, kernels transposed back, one leaf
  at a time. LoRA leaves are merged (``W + s·BA`` in float32, cast to the kernel's dtype) and
  quantised kernels dequantised: the export is the dense model (quantising the merged weight
  again would change it). bfloat16 stays bfloat16. ``AutoModelForCausalLM.from_pretrained``
  loads the directory with no missing or unexpected key.

  Args:
    path: the directory to write.
    model: the :class:`Decoder` (scanned or not) the params belong to.
    variables: ``{"params": ...}``, plain, wrapped or quantised.
    base_config: the source ``config.json`` whose other fields (token ids, ...) to keep.
    tokenizer_from: a checkpoint directory whose tokenizer, chat template and generation
      config files to copy along.
    max_shard_size: split the weights into files of at most this many bytes.
    overwrite: replace an existing directory.

  Raises:
    TypeError: ``model`` is not a :class:`Decoder`.
    ValueError: ``variables`` have no ``params`` or ``params`` do not fit ``model`` (the
      paths named), or ``path`` exists and ``overwrite`` is false.
  """
  if not isinstance(model, Decoder):
    raise TypeError(f"model must be a decoder_model.Decoder; got: {type(model).__name__}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a dict with 'params' (what load_hf_decoder returns)")
  config = model.config
  tensors, source, leaves = _export_plan(config, variables["params"])
  cache: dict[int, np.ndarray] = {}

  def fetch(key: str) -> np.ndarray:
    i, layer, kernel = source[key]
    if i not in cache:  # tensors come leaf by leaf: one merged leaf on the host at a time
      cache.clear()
      x = leaves[i]
      cache[i] = np.asarray(jax.device_get(_merged(x) if _is_node(x) else x))
    value = cache[i] if layer is None else cache[i][layer]
    return value.T if kernel else value

  final = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(final) and not overwrite:
    raise ValueError(f"{final!r} already exists; pass overwrite=True to replace it")
  tmp, old = f"{final}.tmp-{os.getpid()}", f"{final}.old-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  groups = _shards(tensors, max_shard_size)
  names = (
    [_WEIGHTS]
    if len(groups) == 1
    else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  )
  for name, group in zip(names, groups, strict=True):
    _write_safetensors(os.path.join(tmp, name), group, fetch)
  if len(groups) > 1:
    total = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for _, a in tensors)
    weight_map = {key: name for name, group in zip(names, groups, strict=True) for key, _ in group}
    with open(os.path.join(tmp, _SHARD_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf = hf_config(dataclasses.replace(config, param_dtype=tensors[0][1].dtype), base=base_config)
  with open(os.path.join(tmp, _CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer_from is not None:
    source_dir = os.fspath(tokenizer_from)
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copy(os.path.join(source_dir, name), os.path.join(tmp, name))
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)
