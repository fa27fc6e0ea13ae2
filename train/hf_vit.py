"""Loads Hugging Face ViT checkpoints (safetensors on disk) into ``vit.ViT`` parameters.

The safetensors file is read directly: transformers 5.x renames ViT modules in memory
(``layers.N.attention.q_proj``), but the files on disk keep the original key names handled here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from errors import HubUnreachable
from safetensors.numpy import load_file
from vit import ViT

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
# ViTForImageClassification nests the encoder under ``vit.``; its head is replaced anyway.
_PREFIX = "vit."
_IGNORED = ("pooler.", "classifier.")
# "org/name" or "name": what the hub accepts as a repo id (and what a local path rarely looks like).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Transform = Callable[[np.ndarray], np.ndarray]


def _dense(w: np.ndarray) -> np.ndarray:
  """PyTorch ``(out, in)`` linear weight -> Flax ``(in, out)`` kernel."""
  return w.T


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _layer_spec(i: int, num_heads: int) -> dict[tuple[str, ...], tuple[str, Transform]]:
  """Flax path -> (HF key, transform) for encoder block ``i``."""
  src = f"encoder.layer.{i}."
  qkv_kernel = lambda w: w.T.reshape(w.shape[1], num_heads, -1)
  qkv_bias = lambda b: b.reshape(num_heads, -1)
  out_kernel = lambda w: w.T.reshape(num_heads, -1, w.shape[0])
  spec: dict[tuple[str, ...], tuple[str, Transform]] = {}
  for name in ("query", "key", "value"):
    spec[(name, "kernel")] = (f"{src}attention.attention.{name}.weight", qkv_kernel)
    spec[(name, "bias")] = (f"{src}attention.attention.{name}.bias", qkv_bias)
  spec[("out", "kernel")] = (f"{src}attention.output.dense.weight", out_kernel)
  spec[("out", "bias")] = (f"{src}attention.output.dense.bias", _same)
  for ours, theirs in (("mlp_in", "intermediate.dense"), ("mlp_out", "output.dense")):
    spec[(ours, "kernel")] = (f"{src}{theirs}.weight", _dense)
    spec[(ours, "bias")] = (f"{src}{theirs}.bias", _same)
  for ours in ("ln_before", "ln_after"):
    theirs = ours.replace("ln_", "layernorm_")
    spec[(ours, "scale")] = (f"{src}{theirs}.weight", _same)
    spec[(ours, "bias")] = (f"{src}{theirs}.bias", _same)
  return {(f"layer_{i}", *path): v for path, v in spec.items()}


def _spec(num_layers: int, num_heads: int) -> dict[tuple[str, ...], tuple[str, Transform]]:
  """Flax path -> (HF key, transform) for the whole encoder (no classifier head)."""
  spec: dict[tuple[str, ...], tuple[str, Transform]] = {
    ("cls",): ("embeddings.cls_token", _same),
    ("pos_embed",): ("embeddings.position_embeddings", _same),
    # PyTorch conv (out, in, kh, kw) -> Flax (kh, kw, in, out).
    ("patch_embed", "kernel"): (
      "embeddings.patch_embeddings.projection.weight",
      lambda w: w.transpose(2, 3, 1, 0),
    ),
    ("patch_embed", "bias"): ("embeddings.patch_embeddings.projection.bias", _same),
    ("final_ln", "scale"): ("layernorm.weight", _same),
    ("final_ln", "bias"): ("layernorm.bias", _same),
  }
  for i in range(num_layers):
    spec.update(_layer_spec(i, num_heads))
  return spec


def _strip_prefix(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """Drops the ``vit.`` prefix of a classification checkpoint; returns the prefix found."""
  if any(k.startswith(_PREFIX) for k in state):
    prefix = _PREFIX
    return {k.removeprefix(prefix): v for k, v in state.items()}, prefix
  return dict(state), ""


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def convert_hf_vit(state: Mapping[str, np.ndarray], *, num_layers: int, num_heads: int) -> dict:
  """Converts a Hugging Face ViT safetensors state dict into ``ViT`` parameters.

  Args:
    state: HF keys (``embeddings.*``, ``encoder.layer.N.*``, ``layernorm.*``, optionally all
      prefixed ``vit.``) to arrays. ``pooler.*`` and ``classifier.*`` are ignored.
    num_layers: Encoder blocks expected in ``state``.
    num_heads: Attention heads, to split q/k/v/out kernels per head.

  Returns:
    The ``params`` tree of a non-scanned ``ViT`` without ``head``.

  Raises:
    ValueError: If an expected key is missing or an unexpected key is present.
  """
  stripped, prefix = _strip_prefix(state)
  spec = _spec(num_layers, num_heads)
  params: dict = {}
  for path, (key, transform) in spec.items():
    if key not in stripped:
      raise ValueError(f"missing key {prefix + key!r} in the ViT checkpoint")
    _set(params, path, np.asarray(transform(np.asarray(stripped[key]))))
  used = {key for key, _ in spec.values()}
  for key in sorted(stripped):
    if key not in used and not key.startswith(_IGNORED):
      raise ValueError(f"unexpected key {prefix + key!r} in the ViT checkpoint")
  return params


def stack_layers(params: dict, num_layers: int) -> dict:
  """Turns ``layer_0 .. layer_{n-1}`` subtrees into the ``nn.scan`` layout under ``layers``.

  Args:
    params: A non-scanned ``ViT`` params tree.
    num_layers: Number of ``layer_i`` subtrees.

  Returns:
    A new tree whose ``layers`` leaves have a leading layer axis; other entries are kept.
  """
  names = [f"layer_{i}" for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *(params[n] for n in names))
  return out


def _is_repo_id(source: str) -> bool:
  return not os.path.exists(source) and bool(_REPO_ID.match(source))


def _download(repo_id: str) -> str:
  """Fetches config and weights from the hub; any failure is re-raised at once as HubUnreachable."""
  import huggingface_hub
  from huggingface_hub import constants

  # huggingface_hub reads HF_HUB_OFFLINE only at import; honour a later setting too, so offline
  # runs fail without waiting on network timeouts.
  offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
    "1",
    "ON",
    "YES",
    "TRUE",
  )
  try:
    return huggingface_hub.snapshot_download(
      repo_id, allow_patterns=[_CONFIG, "*.safetensors"], local_files_only=offline
    )
  except Exception as err:  # hub, HTTP and offline errors share no common base class
    raise HubUnreachable(
      f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable or offline ({err}). "
      "Point --config.model.source=/path/to/local/dir at a local copy "
      f"(a directory with {_CONFIG} and {_WEIGHTS})."
    ) from err


def _resolve(source: str) -> tuple[str, list[str]]:
  """Returns the ``config.json`` path and the safetensors file(s) for ``source``."""
  if _is_repo_id(source):
    source = _download(source)
  if os.path.isfile(source):
    if not source.endswith(".safetensors"):
      raise ValueError(f"expected a .safetensors file or a directory, got {source!r}")
    return os.path.join(os.path.dirname(source), _CONFIG), [source]
  if not os.path.isdir(source):
    raise FileNotFoundError(f"no such checkpoint directory or file: {source!r}")
  index = os.path.join(source, _SHARD_INDEX)
  if os.path.isfile(index) and not os.path.isfile(os.path.join(source, _WEIGHTS)):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return os.path.join(source, _CONFIG), [os.path.join(source, s) for s in shards]
  return os.path.join(source, _CONFIG), [os.path.join(source, _WEIGHTS)]


def _model_from_config(path: str, num_classes: int, scan_layers: bool) -> ViT:
  """Builds a ``ViT`` from a transformers ``config.json``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{_CONFIG} not found at {path!r}")
  with open(path) as f:
    cfg = json.load(f)
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only exact 'gelu' is ported")
  return ViT(
    num_classes=num_classes,
    patch_size=cfg["patch_size"],
    hidden_size=cfg["hidden_size"],
    num_layers=cfg["num_hidden_layers"],
    num_heads=cfg["num_attention_heads"],
    mlp_dim=cfg["intermediate_size"],
    layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
    scan_layers=scan_layers,
  )


def _check_shapes(expected: Any, loaded: Any) -> None:
  """Raises ``ValueError`` unless both trees have the same structure and leaf shapes."""
  exp = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  if exp.keys() != got.keys():
    raise ValueError(f"checkpoint params differ from the model: {sorted(exp.keys() ^ got.keys())}")
  bad = {k: (got[k], exp[k]) for k in exp if tuple(got[k]) != tuple(exp[k])}
  if bad:
    raise ValueError(f"checkpoint shapes (got, expected) differ from the model: {bad}")


def load_hf_vit(
  source: str, *, num_classes: int, key: jax.Array, scan_layers: bool = False
) -> tuple[ViT, dict]:
  """Loads a Hugging Face ViT checkpoint with a fresh zero classifier head.

  Args:
    source: A directory with ``config.json`` and ``model.safetensors``, a ``.safetensors`` file
      (``config.json`` beside it), or a hub repo id such as ``google/vit-base-patch16-224-in21k``.
    num_classes: Outputs of the new head.
    key: PRNG key for the (abstract) initialisation that fixes parameter shapes.
    scan_layers: Build a scanned model and stack the layer parameters accordingly.

  Returns:
    ``(model, {"params": params})`` with float32 parameters.

  Raises:
    HubUnreachable: If a hub repo id cannot be fetched (offline or unreachable hub).
    ValueError: On an unsupported config or a checkpoint that does not fit the model.
  """
  config_path, files = _resolve(source)
  model = _model_from_config(config_path, num_classes, scan_layers)
  state: dict[str, np.ndarray] = {}
  for file in files:
    state.update(load_file(file))
  params = convert_hf_vit(state, num_layers=model.num_layers, num_heads=model.num_heads)
  if scan_layers:
    params = stack_layers(params, model.num_layers)
  # pos_embed fixes the image size; derive it so the abstract init sees the checkpoint's grid.
  side = int(round(np.sqrt(params["pos_embed"].shape[1] - 1))) * model.patch_size
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  abstract = jax.eval_shape(model.init, key, images)["params"]
  head = abstract["head"]
  params["head"] = {k: np.zeros(v.shape, v.dtype) for k, v in head.items()}
  _check_shapes(abstract, params)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return model, {"params": params}
