"""Parameter names of :class:`decoder_model.Decoder`: transformers' modules, PyTorch keys, layouts.

Our module paths (``layers_3/self_attn/q_proj``, or ``layers/...`` for a scanned model) map to
transformers' module names (:func:`module_name`, :func:`peft_modules` for PEFT adapter files)
and leaf paths to PyTorch state-dict keys (:func:`torch_keys`, :func:`from_torch_state_dict`);
:func:`layouts` gives lorax_fn the axes of scan-stacked kernels, and :func:`stack_layers` /
:func:`unstack_layers` convert between the unrolled and the ``nn.scan`` layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from decoder_config import DecoderConfig

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def module_name(path: str) -> str:
  """transformers' in-memory module name of one of our module paths.

  A scanned path (``layers/...``) gets a ``"{}"`` layer placeholder, as ``lorax_fn.save_peft``
  expects of a stacked kernel.

  Args:
    path: A ``"/"``-joined module path of :class:`Decoder` params.

  Returns:
    The module name in ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``.

  Raises:
    ValueError: The path is no module of a decoder.

  Example:
    >>> module_name("layers_3/self_attn/q_proj"), module_name("layers/mlp/up_proj")
    ('model.layers.3.self_attn.q_proj', 'model.layers.{}.mlp.up_proj')
    >>> module_name("lm_head"), module_name("embed_tokens"), module_name("norm")
    ('lm_head', 'model.embed_tokens', 'model.norm')
  """
  first, _, rest = path.partition("/")
  if path == "lm_head":
    return "lm_head"
  if path in ("embed_tokens", "norm"):
    return f"model.{path}"
  if first == "layers" and rest:
    return f"model.layers.{{}}.{rest.replace('/', '.')}"
  if first.startswith("layers_") and first[len("layers_") :].isdigit() and rest:
    return f"model.layers.{first[len('layers_') :]}.{rest.replace('/', '.')}"
  raise ValueError(f"{path!r} is no module path of a Decoder's params")


def _modules(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, list[str]]:
  """Module path -> its leaf names: every mapping of ``params`` holding a non-mapping value."""
  out: dict[str, list[str]] = {}
  leaves = [k for k, v in params.items() if not isinstance(v, Mapping)]
  if leaves and prefix:
    out["/".join(prefix)] = leaves
  for k, v in params.items():
    if isinstance(v, Mapping):
      out.update(_modules(v, (*prefix, k)))
  return out


def peft_modules(params: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
  """The ``modules`` argument of ``lorax_fn.save_peft`` / ``load_peft`` for decoder params.

  Args:
    params: :class:`Decoder` params (plain, wrapped or quantised; unrolled or scanned).
    prefix: Prepended to our paths: ``""`` for ``variables["params"]``, ``"params"`` for a
      whole variables dict.

  Returns:
    Each module path of ``params`` -> transformers' module name (see :func:`module_name`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from decoder_model import Decoder
    >>> c = DecoderConfig(11, 8, 12, 2, 2, 1, head_dim=4, scan_layers=True)
    >>> p = jax.eval_shape(Decoder(c).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    >>> p = p["params"]
    >>> peft_modules(p)["layers/self_attn/q_proj"]
    'model.layers.{}.self_attn.q_proj'
    >>> peft_modules(p, prefix="params")["params/lm_head"]
    'lm_head'
  """
  if not isinstance(prefix, str):
    raise TypeError(f"prefix must be a str such as 'params'; got: {prefix!r}")
  root = "".join(f"{part}/" for part in prefix.split("/") if part)
  return {root + path: module_name(path) for path in _modules(params)}


def layouts(params: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """``layouts=`` for ``lorax_fn.wrap`` / ``save_peft``: every scan-stacked kernel's axes.

  Args:
    params: :class:`Decoder` params; only a scanned model's ``layers`` kernels are listed.

  Returns:
    ``{"layers/self_attn/q_proj/kernel": ("stack", "in", "out"), ...}``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from decoder_model import Decoder
    >>> c = DecoderConfig(11, 8, 12, 2, 2, 1, head_dim=4, scan_layers=True)
    >>> p = jax.eval_shape(Decoder(c).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    >>> p = p["params"]
    >>> layouts(p)["layers/mlp/down_proj/kernel"]
    ('stack', 'in', 'out')
  """
  out = {}
  for path, leaves in _modules(params).items():
    if path.startswith("layers/") and "kernel" in leaves:
      out[f"{path}/kernel"] = ("stack", "in", "out")
  return out


def _leaf_key(path: tuple[str, ...]) -> str:
  return f"{module_name('/'.join(path[:-1]))}.{_LEAF_NAMES[path[-1]]}"


def torch_keys(params: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
  """Each leaf path of unrolled :class:`Decoder` params -> its PyTorch state-dict key.

  Example:
    >>> keys = torch_keys({"layers_0": {"mlp": {"up_proj": {"kernel": 0}}}, "norm": {"scale": 0}})
    >>> keys[("layers_0", "mlp", "up_proj", "kernel")], keys[("norm", "scale")]
    ('model.layers.0.mlp.up_proj.weight', 'model.norm.weight')
  """
  return {
    (*module.split("/"), leaf): _leaf_key((*module.split("/"), leaf))
    for module, leaves in _modules(params).items()
    for leaf in leaves
  }


def abstract_params(config: DecoderConfig) -> Any:
  """The params of a :class:`Decoder` as ``jax.ShapeDtypeStruct`` s: nothing is allocated.

  Example:
    >>> p = abstract_params(DecoderConfig(11, 8, 12, 2, 2, 1, head_dim=4, scan_layers=True))
    >>> p["layers"]["mlp"]["up_proj"]["kernel"].shape
    (2, 8, 12)
  """
  from decoder_model import Decoder  # (decoder_model re-exports this module: no top-level cycle)

  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(Decoder(config).init, jax.random.key(0), ids)["params"]


def from_torch_state_dict(state: Mapping[str, Any], config: DecoderConfig) -> dict:
  """:class:`Decoder` params from a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` state dict.

  Linear weights ``(out, in)`` become kernels ``weight.T``; embeddings and norm weights are
  kept. A tied model's ``lm_head.weight`` (the embedding again) is ignored.

  Args:
    state: PyTorch keys -> arrays (numpy, or torch tensors on the CPU).
    config: The architecture; a scanned one gets the layers stacked under ``layers``.

  Returns:
    The ``params`` tree, in ``config.param_dtype``.

  Raises:
    ValueError: A missing key, a key the model lacks, or a shape that does not fit (named).
  """
  expected = abstract_params(dataclasses.replace(config, scan_layers=False))
  keys = torch_keys(expected)
  flat = {}
  for path, key in keys.items():
    if key not in state:
      raise ValueError(f"missing key {key!r} in the state dict")
    value = np.asarray(state[key].float().numpy() if hasattr(state[key], "numpy") else state[key])
    if path[-1] == "kernel":
      value = value.T
    want = _get(expected, path).shape
    if value.shape != want:
      raise ValueError(f"{key!r} has shape {value.shape}; expected {want[::-1]} for {path}")
    flat[path] = jnp.asarray(value, config.param_dtype)
  # A tied model's state dict repeats the embedding as lm_head.weight.
  ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
  unused = {k for k in set(state) - set(keys.values()) - ignored if "rotary_emb" not in k}
  if unused:
    raise ValueError(f"the state dict has keys the model lacks: {sorted(unused)[:5]}")
  params: dict = {}
  for path, value in flat.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return stack_layers(params, config.num_hidden_layers) if config.scan_layers else params


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict:
  """``layers_0 .. layers_{n-1}`` stacked into the ``nn.scan`` layout under ``layers``.

  Example:
    >>> p = {"layers_0": {"w": jnp.zeros(2)}, "layers_1": {"w": jnp.ones(2)}, "norm": 1}
    >>> s = stack_layers(p, 2)
    >>> sorted(s), s["layers"]["w"].shape
    (['layers', 'norm'], (2, 2))
  """
  names = [f"layers_{i}" for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
  return out


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict:
  """The inverse of :func:`stack_layers`.

  Example:
    >>> p = unstack_layers({"layers": {"w": jnp.zeros((2, 3))}}, 2)
    >>> sorted(p), p["layers_1"]["w"].shape
    (['layers_0', 'layers_1'], (3,))
  """
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
