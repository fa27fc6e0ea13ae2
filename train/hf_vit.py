"""Hugging Face ViT checkpoints <-> ``vit.ViT`` parameters, and the names PEFT uses for them.

One table (``_spec``) maps each Flax parameter to its safetensors key and converts it both
ways: :func:`load_hf_vit` reads a checkpoint with it, :func:`save_hf_vit` writes one (LoRA
merged) that ``transformers.ViTForImageClassification.from_pretrained`` loads, and
:func:`peft_modules` derives from it the PyTorch module names ``lorax_fn.save_peft`` /
``load_peft`` need. The safetensors file is read directly: transformers 5.x renames ViT
modules in memory (``vit.layers.N.attention.q_proj``), but the files on disk keep the
original key names (``vit.encoder.layer.N.attention.attention.query``) handled here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from errors import HubUnreachable
from safetensors.numpy import load_file, save_file
from vit import ViT

import lorax_fn as lora_fn

_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
# ViTForImageClassification nests the encoder under ``vit.``; its head is replaced anyway.
_PREFIX = "vit."
_IGNORED = ("pooler.", "classifier.")
# "org/name" or "name": what the hub accepts as a repo id (and what a local path rarely looks like).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# transformers 5 renames ViT's modules in memory (transformers/conversion_mapping.py,
# "ViTModel"); files on disk keep the 4.x names. Applied in order, as transformers does.
_RENAMES_5X = (
  ("encoder.layer.", "layers."),
  ("attention.query", "q_proj"),
  ("attention.key", "k_proj"),
  ("attention.value", "v_proj"),
  ("attention.output.dense", "attention.o_proj"),
  ("intermediate.dense", "mlp.fc1"),
  ("output.dense", "mlp.fc2"),
)

Transform = Callable[[np.ndarray], np.ndarray]


class _Tensor(NamedTuple):
  """One Hugging Face tensor: its key on disk and how it converts each way."""

  key: str
  to_flax: Transform
  to_torch: Transform


def _same(key: str) -> _Tensor:
  return _Tensor(key, lambda x: x, lambda x: x)


def _dense(key: str) -> _Tensor:
  """PyTorch ``(out, in)`` linear weight <-> Flax ``(in, out)`` kernel."""
  return _Tensor(key, lambda w: w.T, lambda k: k.T)


def _block_spec(index: str, num_heads: int) -> dict[tuple[str, ...], _Tensor]:
  """Flax path within a block -> tensor, for encoder block ``index``.

  ``index`` is a layer number, or ``"{}"``: the layer placeholder of a scan-stacked block,
  whose keys name a module per layer (only the names of such a spec are used).
  """
  src = f"encoder.layer.{index}."
  spec: dict[tuple[str, ...], _Tensor] = {}
  for name in ("query", "key", "value"):
    key = f"{src}attention.attention.{name}"
    spec[(name, "kernel")] = _Tensor(
      f"{key}.weight",
      lambda w: w.T.reshape(w.shape[1], num_heads, -1),  # (in, heads, head_dim)
      lambda k: k.reshape(k.shape[0], -1).T,
    )
    spec[(name, "bias")] = _Tensor(
      f"{key}.bias", lambda b: b.reshape(num_heads, -1), lambda b: b.reshape(-1)
    )
  spec[("out", "kernel")] = _Tensor(
    f"{src}attention.output.dense.weight",
    lambda w: w.T.reshape(num_heads, -1, w.shape[0]),  # (heads, head_dim, out)
    lambda k: k.reshape(-1, k.shape[-1]).T,
  )
  spec[("out", "bias")] = _same(f"{src}attention.output.dense.bias")
  for ours, theirs in (("mlp_in", "intermediate.dense"), ("mlp_out", "output.dense")):
    spec[(ours, "kernel")] = _dense(f"{src}{theirs}.weight")
    spec[(ours, "bias")] = _same(f"{src}{theirs}.bias")
  for ours in ("ln_before", "ln_after"):
    theirs = ours.replace("ln_", "layernorm_")
    spec[(ours, "scale")] = _same(f"{src}{theirs}.weight")
    spec[(ours, "bias")] = _same(f"{src}{theirs}.bias")
  return spec


def _spec(
  num_layers: int, num_heads: int, *, scan: bool = False, head: bool = False
) -> dict[tuple[str, ...], _Tensor]:
  """Flax path -> tensor for the whole model: the one table every conversion reads.

  Without ``head``: the encoder, keys as ``ViTModel`` names them (``encoder.layer.0...``).
  With ``head``: the classifier too, every key as ``ViTForImageClassification`` names it
  (``vit.encoder.layer.0...``, ``classifier.weight``). ``scan``: the blocks as one ``layers``
  subtree, their keys with a ``"{}"`` layer placeholder.
  """
  spec: dict[tuple[str, ...], _Tensor] = {
    ("cls",): _same("embeddings.cls_token"),
    ("pos_embed",): _same("embeddings.position_embeddings"),
    ("patch_embed", "kernel"): _Tensor(
      "embeddings.patch_embeddings.projection.weight",
      lambda w: w.transpose(2, 3, 1, 0),  # PyTorch conv (out, in, kh, kw) -> (kh, kw, in, out)
      lambda k: k.transpose(3, 2, 0, 1),
    ),
    ("patch_embed", "bias"): _same("embeddings.patch_embeddings.projection.bias"),
    ("final_ln", "scale"): _same("layernorm.weight"),
    ("final_ln", "bias"): _same("layernorm.bias"),
  }
  blocks = [("layers", "{}")] if scan else [(f"layer_{i}", str(i)) for i in range(num_layers)]
  for name, index in blocks:
    spec.update({(name, *path): t for path, t in _block_spec(index, num_heads).items()})
  if head:
    spec = {path: t._replace(key=_PREFIX + t.key) for path, t in spec.items()}
    spec[("head", "kernel")] = _dense("classifier.weight")
    spec[("head", "bias")] = _same("classifier.bias")
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
  for path, tensor in spec.items():
    if tensor.key not in stripped:
      raise ValueError(f"missing key {prefix + tensor.key!r} in the ViT checkpoint")
    _set(params, path, np.asarray(tensor.to_flax(np.asarray(stripped[tensor.key]))))
  used = {tensor.key for tensor in spec.values()}
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


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of :func:`stack_layers`: ``layers`` split into ``layer_0 .. layer_{n-1}``.

  Args:
    params: A scanned ``ViT`` params tree.
    num_layers: Length of the leading layer axis of the ``layers`` leaves.

  Returns:
    A new tree with one subtree per layer; other entries are kept.
  """
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
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


# ------------------------------------------------------------------------------------------
# PEFT module names
# ------------------------------------------------------------------------------------------


def _in_memory(name: str) -> str:
  """A module's on-disk (transformers 4.x) name as transformers 5.x names it in memory."""
  for old, new in _RENAMES_5X:
    name = name.replace(old, new)
  return name


def _check_model(model: Any) -> None:
  if not isinstance(model, ViT):
    raise TypeError(f"model must be a vit.ViT; got: {type(model).__name__}")


def peft_modules(model: ViT, *, prefix: str = "") -> dict[str, tuple[str, ...]]:
  """The ``modules`` mapping of ``lorax_fn.save_peft`` / ``load_peft`` for this ViT.

  Derived from the table that converts the weights: each of our modules (a parameter path
  minus its leaf name) maps to the ``ViTForImageClassification`` module holding those
  weights, first as transformers 5.x names it in memory (what PEFT 0.21 writes and loads:
  ``vit.layers.0.attention.q_proj``), then its 4.x name (``vit.encoder.layer.0.attention.
  attention.query``, what adapters saved with transformers 4 name), which ``load_peft`` also
  reads. The head is ``classifier``. A scanned model's blocks map with a ``"{}"`` layer
  placeholder (``vit.layers.{}.attention.q_proj``): one PyTorch module per layer. ``cls`` and
  ``pos_embed`` belong to no module of ours and are not mapped.

  Args:
    model: the ``ViT`` (its layer count, and whether it is scanned, fix the paths).
    prefix: prepended to our paths: ``""`` for ``variables["params"]``, ``"params"`` for a
      whole variables dict (as ``train/run.py`` holds it).

  Returns:
    Our module path -> PyTorch module names (the first is written, all are read).

  Raises:
    TypeError: ``model`` is not a ``ViT`` or ``prefix`` not a str.

  Example:
    >>> from vit import ViT
    >>> modules = peft_modules(ViT(num_classes=3, num_layers=2), prefix="params")
    >>> modules["params/layer_1/query"]
    ('vit.layers.1.attention.q_proj', 'vit.encoder.layer.1.attention.attention.query')
    >>> modules["params/head"], modules["params/final_ln"]
    (('classifier',), ('vit.layernorm',))
    >>> peft_modules(ViT(num_classes=3, num_layers=2, scan_layers=True))["layers/mlp_in"]
    ('vit.layers.{}.mlp.fc1', 'vit.encoder.layer.{}.intermediate.dense')
  """
  _check_model(model)
  if not isinstance(prefix, str):
    raise TypeError(f"prefix must be a str such as 'params'; got: {prefix!r}")
  root = tuple(part for part in prefix.split("/") if part)
  spec = _spec(model.num_layers, model.num_heads, scan=model.scan_layers, head=True)
  modules: dict[str, tuple[str, ...]] = {}
  for path, tensor in spec.items():
    if len(path) < 2:
      continue  # cls, pos_embed: parameters of ViTEmbeddings itself
    on_disk = tensor.key.rpartition(".")[0]
    modules["/".join(root + path[:-1])] = tuple(dict.fromkeys((_in_memory(on_disk), on_disk)))
  return modules


# ------------------------------------------------------------------------------------------
# Export: a merged Hugging Face checkpoint
# ------------------------------------------------------------------------------------------


def _hf_config(model: ViT, image_size: int, class_names: list[str], dtype: str) -> dict:
  """``config.json`` of a ``ViTForImageClassification`` computing what ``model`` computes."""
  return {
    "architectures": ["ViTForImageClassification"],
    "model_type": "vit",
    "hidden_size": model.hidden_size,
    "num_hidden_layers": model.num_layers,
    "num_attention_heads": model.num_heads,
    "intermediate_size": model.mlp_dim,
    "hidden_act": "gelu",  # exact (erf) GELU, as vit.py computes
    "layer_norm_eps": model.layer_norm_eps,
    "image_size": image_size,
    "patch_size": model.patch_size,
    "num_channels": 3,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "id2label": {str(i): name for i, name in enumerate(class_names)},
    "label2id": {name: i for i, name in enumerate(class_names)},
    "dtype": dtype,
  }


def _flat_arrays(params: Any) -> dict[tuple[str, ...], np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in flat}


def _storable(x: np.ndarray) -> np.ndarray:
  # safetensors.numpy has no bfloat16; widening to float32 is exact.
  return x if x.dtype in (np.float16, np.float32, np.float64) else x.astype(np.float32)


def _write_checkpoint(path: str, config: dict, state: dict, overwrite: bool) -> None:
  """Writes beside ``path`` and renames, so a checkpoint is never half-written."""
  final = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(final) and not overwrite:
    raise ValueError(f"{final!r} already exists; pass overwrite=True to replace it")
  tmp, old = f"{final}.tmp-{os.getpid()}", f"{final}.old-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  # transformers refuses a safetensors file whose metadata does not say "pt".
  save_file(state, os.path.join(tmp, _WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(tmp, _CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)


def save_hf_vit(
  path: str | os.PathLike,
  model: ViT,
  params: Any,
  class_names: Sequence[str],
  *,
  overwrite: bool = False,
) -> None:
  """Writes ``params``, LoRA merged, as a Hugging Face ``ViTForImageClassification``.

  ``model.safetensors`` holds every tensor under transformers' on-disk names (the inverse of
  :func:`convert_hf_vit`, plus ``classifier.*``) and ``config.json`` is built from ``model``
  (so the offline bases, ``"random"`` and ``"pretrain:digits"``, export too), with
  ``id2label`` / ``label2id`` from ``class_names``; ``from_pretrained(path)`` then loads a plain
  model with no missing or unexpected key. LoRA leaves are folded in by ``lorax_fn.merge``
  (``W + s·BA`` in float32, cast back to the kernel's dtype); a quantised base is dequantised
  first, and the export is the dense merged weight (quantising it again would change the
  outputs). bfloat16 weights are written as float32.

  Args:
    path: the directory to write.
    model: the ``ViT`` the params belong to (scanned or not).
    params: ``variables["params"]``, wrapped or plain, on this host.
    class_names: one name per output of the head, in order.
    overwrite: replace an existing directory.

  Raises:
    TypeError: ``model`` is not a ``ViT``.
    ValueError: ``class_names`` do not name the head's outputs, ``params`` do not fit
      ``model`` (the paths named), or ``path`` exists and ``overwrite`` is false.
  """
  _check_model(model)
  names = list(class_names) if not isinstance(class_names, str) else [class_names]
  if len(names) != model.num_classes or len(set(names)) != len(names):
    raise ValueError(
      f"class_names must be {model.num_classes} distinct names, one per output of the head; "
      f"got: {names[:8]!r}"
    )
  is_node = lambda x: lora_fn.is_lora(x) or lora_fn.is_quant(x)
  if any(is_node(x) for x in jax.tree.leaves(params, is_leaf=is_node)):
    params = lora_fn.merge(params)
  flat = _flat_arrays(unstack_layers(params, model.num_layers) if model.scan_layers else params)
  spec = _spec(model.num_layers, model.num_heads, head=True)
  missing = sorted("/".join(p) for p in spec.keys() - flat.keys())
  extra = sorted("/".join(p) for p in flat.keys() - spec.keys())
  if missing or extra:
    scanned = "scanned" if model.scan_layers else "unrolled"
    raise ValueError(
      f"params do not fit the {scanned} ViT of {model.num_layers} layers: missing "
      f"{missing[:6]}, unexpected {extra[:6]}"
    )
  state = {t.key: np.ascontiguousarray(_storable(t.to_torch(flat[p]))) for p, t in spec.items()}
  side = math.isqrt(flat[("pos_embed",)].shape[1] - 1) * model.patch_size
  dtype = str(state["classifier.weight"].dtype)
  _write_checkpoint(path, _hf_config(model, side, names, dtype), state, overwrite)
