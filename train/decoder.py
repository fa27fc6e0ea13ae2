"""Hugging Face decoder checkpoints (Llama family, Qwen2) <-> :class:`Decoder` parameters.

:func:`load_hf_decoder` reads a transformers checkpoint directory (one ``model.safetensors`` or
shards with ``model.safetensors.index.json``) tensor by tensor: each tensor is converted
(``weight.T`` for a linear layer), quantised on the fly if targeted (NF4 in PyTorch order:
bitsandbytes' codes, in a ``transposed`` ``QuantLeaf``) and placed on the mesh before the next
is read, so host memory holds about one tensor besides the loaded model. A bitsandbytes 4-bit
checkpoint (a ``-bnb-4bit`` repo) loads straight into ``QuantLeaf`` s, its codes and scales as
stored, decoding bit for bit as bitsandbytes does. :func:`save_hf_decoder` writes a directory
transformers' ``AutoModelForCausalLM.from_pretrained`` loads (LoRA merged, dequantised).

How each leaf is read lives in ``decoder_load``, the export in ``decoder_export``, the
safetensors reader and writer (bfloat16 included, one tensor in memory at a time) in
``safetensors_io``. The model, its configuration and :func:`generate` live in
``decoder_model``; all are re-exported here, so callers import this one module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import decoder_load
import jax
import jax.numpy as jnp
import numpy as np
from decoder_export import CONFIG, hf_config, save_hf_decoder
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
from safetensors_io import WEIGHTS, read_header, read_index, read_tensor, weight_files

import lorax_fn as lora_fn

__all__ = [
  "ARCHITECTURES",
  "LINEAR_TARGETS",
  "Decoder",
  "DecoderConfig",
  "generate",
  "hf_config",
  "load_hf_decoder",
  "read_header",
  "read_tensor",
  "resolve_checkpoint",
  "save_hf_decoder",
  "stack_layers",
  "torch_keys",
  "unstack_layers",
]

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear kernels of every decoder layer: what QLoRA quantises (and adapts)."""

_KINDS = ("nf4", "int4", "int8")
# Tensors a checkpoint may hold that no parameter stands for (older Llama files saved them).
_HARMLESS = re.compile(r"(.*\.)?rotary_emb\.inv_freq$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a decoder repo needs besides the weights: configs, tokenizer, chat template.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


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
      f"a local directory with {CONFIG} and {WEIGHTS} (or its shards) instead."
    ) from err


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


def _shardings(leaves: Sequence[decoder_load.Leaf], mesh: Mesh | None, rules: Any) -> list[Any]:
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


def _place(value: Any, sharding: Any) -> Any:
  """``value`` (host or one-device arrays) on the default device or as global arrays.

  Each device receives only its shard. In a multi-process run every process has read the same
  checkpoint, so each takes its shards from its own copy (``jax.device_put`` would first
  gather the whole value from every process to check that they agree).
  """
  if sharding is None or jax.process_count() == 1:
    return jax.device_put(value, sharding)

  def one(x: Any, s: NamedSharding) -> jax.Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, value, sharding)


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
  config_path = os.path.join(directory, CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{CONFIG} not found in {directory!r}")
  with open(config_path) as f:
    hf = json.load(f)
  decoder_load.check_quantization_config(hf)
  pdtype = _param_dtype(param_dtype, hf)
  options = dict(param_dtype=pdtype, scan_layers=scan_layers, remat=remat)
  config = DecoderConfig.from_hf(hf, **options, **({} if dtype is None else dict(dtype=dtype)))
  tensors = read_index(weight_files(directory))
  opts = decoder_load.Options(quantize, quantize_targets, block_size, double_quant, pdtype)
  leaves, used = decoder_load.plan(config, tensors, opts)
  ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
  extra = sorted(k for k in tensors.keys() - used - ignored if not _HARMLESS.match(k))
  if extra:
    raise ValueError(
      f"the checkpoint has {len(extra)} tensors the {config.model_type} model does not: {extra[:8]}"
    )
  params: dict = {}
  for leaf, sharding in zip(leaves, _shardings(leaves, mesh, rules), strict=True):
    value = leaf.load()
    _set(params, leaf.path, _place(value, sharding))
    del value  # the host copy goes before the next tensor is read
  return Decoder(config), {"params": params}
