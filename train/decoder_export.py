"""A :class:`decoder_model.Decoder`'s params written as a transformers checkpoint directory.

:func:`save_hf_decoder` writes what ``AutoModelForCausalLM.from_pretrained`` loads:
``config.json`` (:func:`hf_config`) and the weights under PyTorch's names, kernels transposed
back, one leaf at a time, LoRA merged and quantised kernels dequantised (the export is the
dense model), bfloat16 kept, in one ``model.safetensors`` or shards with their index.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from decoder_config import ARCHITECTURES, DecoderConfig
from decoder_model import Decoder
from decoder_names import abstract_params, torch_keys
from safetensors_io import SHARD_INDEX, WEIGHTS, write_safetensors

import lorax_fn as lora_fn

CONFIG = "config.json"
# Files of a checkpoint's tokenizer, chat template and generation settings.
TOKENIZER_FILES = (
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
    for p, x in jax.tree_util.tree_leaves_with_path(abstract_params(config))
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
  keys = torch_keys(abstract_params(dataclasses.replace(config, scan_layers=False)))
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
    [WEIGHTS]
    if len(groups) == 1
    else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  )
  for name, group in zip(names, groups, strict=True):
    write_safetensors(os.path.join(tmp, name), group, fetch)
  if len(groups) > 1:
    total = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for _, a in tensors)
    weight_map = {key: name for name, group in zip(names, groups, strict=True) for key, _ in group}
    with open(os.path.join(tmp, SHARD_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf = hf_config(dataclasses.replace(config, param_dtype=tensors[0][1].dtype), base=base_config)
  with open(os.path.join(tmp, CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer_from is not None:
    source_dir = os.fspath(tokenizer_from)
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copy(os.path.join(source_dir, name), os.path.join(tmp, name))
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)
