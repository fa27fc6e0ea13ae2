"""The architecture of a :class:`decoder_model.Decoder`, read from transformers' ``config.json``.

:class:`DecoderConfig` holds what ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` are built from
(sizes, RoPE settings with Llama 3's frequency scaling, which projections have biases, tied
embeddings) and how our model computes (dtypes, ``scan_layers``, ``remat``);
:meth:`DecoderConfig.from_hf` reads both spellings of RoPE settings transformers has written.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# model_type -> the architecture transformers writes for it in config.json.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's frequency-dependent RoPE scaling (transformers' ``rope_type: "llama3"``).

  Attributes:
    factor: How much longer the context is than in pre-training.
    low_freq_factor: Wavelengths above ``original_max_position_embeddings / low_freq_factor``
      are divided by ``factor``.
    high_freq_factor: Wavelengths below ``original_max_position_embeddings / high_freq_factor``
      are kept; those in between are interpolated.
    original_max_position_embeddings: The pre-training context length.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The architecture of a :class:`Decoder` and how it computes.

  Attributes:
    vocab_size: Tokens in the vocabulary.
    hidden_size: Width of the residual stream.
    intermediate_size: Width of the SwiGLU MLP.
    num_hidden_layers: Decoder layers.
    num_attention_heads: Query heads.
    num_key_value_heads: Key/value heads (grouped-query attention); divides the query heads.
    head_dim: Width of one head.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base.
    rope_scaling: Llama 3 frequency scaling, or ``None``.
    attention_bias: Whether q/k/v projections have a bias.
    o_proj_bias: Whether the attention output projection has a bias.
    mlp_bias: Whether the MLP projections have biases.
    tie_word_embeddings: Logits from the embedding table (no ``lm_head``).
    max_position_embeddings: The context length of the checkpoint (informational).
    model_type: ``"llama"`` or ``"qwen2"``.
    dtype: Compute dtype (e.g. ``jnp.bfloat16``); norms, softmax and logits stay float32.
    param_dtype: dtype of freshly initialised parameters.
    scan_layers: Run the layers with ``nn.scan``: one ``layers`` subtree whose leaves have a
      leading layer axis, instead of ``layers_0`` ... ``layers_{L-1}``.
    remat: Rematerialise each layer in the backward pass (saving nothing).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False
  o_proj_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  model_type: str = "llama"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self) -> None:
    for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
    ):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got: {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_key_value_heads must divide num_attention_heads; got: {self.num_key_value_heads} "
        f"and {self.num_attention_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings; got: {self.head_dim}")
    if self.model_type not in ARCHITECTURES:
      raise ValueError(
        f"model_type must be one of {tuple(ARCHITECTURES)}; got: {self.model_type!r}"
      )

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], **options: Any) -> DecoderConfig:
    """The configuration of a transformers ``config.json`` (as a dict).

    Args:
      config: The parsed ``config.json`` of a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``.
        RoPE settings are read from ``rope_parameters`` (transformers 5) or ``rope_scaling``
        and ``rope_theta`` (earlier files).
      **options: Model options: ``dtype``, ``param_dtype``, ``scan_layers``, ``remat``.

    Returns:
      The configuration.

    Raises:
      ValueError: An unsupported ``model_type``/``architectures``, activation, sliding-window
        attention or ``rope_type``, a missing field, or an unknown option.

    Example:
      >>> c = DecoderConfig.from_hf({"model_type": "qwen2", "vocab_size": 11, "hidden_size": 8,
      ...   "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
      ...   "num_key_value_heads": 1, "rope_theta": 1e6}, scan_layers=True)
      >>> c.head_dim, c.attention_bias, c.o_proj_bias, c.rope_theta, c.scan_layers
      (4, True, False, 1000000.0, True)
    """
    if not isinstance(config, Mapping):
      raise TypeError(f"config must be the dict of a config.json; got: {type(config).__name__}")
    unknown = set(options) - {"dtype", "param_dtype", "scan_layers", "remat"}
    if unknown:
      raise ValueError(
        f"unknown options {sorted(unknown)}; choose from dtype, param_dtype, scan_layers, remat"
      )
    model_type = _check_architecture(config)
    get = functools.partial(_required, config)
    act = config.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act must be 'silu' for {model_type}; got: {act!r}")
    if config.get("use_sliding_window"):
      raise ValueError("sliding-window attention (use_sliding_window: true) is not supported")
    heads = get("num_attention_heads")
    theta, scaling = _rope_settings(config)
    qwen2 = model_type == "qwen2"
    return cls(
      vocab_size=get("vocab_size"),
      hidden_size=get("hidden_size"),
      intermediate_size=get("intermediate_size"),
      num_hidden_layers=get("num_hidden_layers"),
      num_attention_heads=heads,
      num_key_value_heads=config.get("num_key_value_heads") or heads,
      head_dim=config.get("head_dim") or get("hidden_size") // heads,
      rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      # Qwen2 always has q/k/v bias and never an output bias; Llama has both or neither.
      attention_bias=True if qwen2 else bool(config.get("attention_bias", False)),
      o_proj_bias=False if qwen2 else bool(config.get("attention_bias", False)),
      mlp_bias=False if qwen2 else bool(config.get("mlp_bias", False)),
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
      model_type=model_type,
      **options,
    )


def _required(config: Mapping[str, Any], name: str) -> Any:
  if name not in config:
    raise ValueError(f"config.json has no {name!r}")
  return config[name]


def _check_architecture(config: Mapping[str, Any]) -> str:
  """The model type of a supported config; a ValueError naming both fields otherwise."""
  model_type = config.get("model_type")
  architectures = config.get("architectures") or []
  supported = ", ".join(f"model_type {t!r} ({a})" for t, a in ARCHITECTURES.items())
  if model_type not in ARCHITECTURES or any(a != ARCHITECTURES[model_type] for a in architectures):
    raise ValueError(
      f"unsupported decoder: model_type {model_type!r}, architectures {list(architectures)}; "
      f"supported: {supported}"
    )
  return model_type


def _rope_settings(config: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, rope_scaling)`` from either spelling transformers has written."""
  rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
  theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")
  partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(f"partial_rotary_factor must be 1.0; got: {partial!r}")
  if rope_type == "default":
    return theta, None
  missing = [k for k in _LLAMA3_KEYS if k not in rope]
  if missing:
    raise ValueError(f"rope_type 'llama3' needs {list(_LLAMA3_KEYS)}; missing: {missing}")
  original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
  if original is None:
    raise ValueError("rope_type 'llama3' needs original_max_position_embeddings")
  return theta, RopeScaling(*(float(rope[k]) for k in _LLAMA3_KEYS), int(original))


_LLAMA3 = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 128256,
  "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0,
  "max_position_embeddings": 8192,
  "tie_word_embeddings": False,
  "rope_scaling": {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  },
}
# The published config.json of Meta-Llama-3-8B and -70B (shapes for planning and checks).
# The published config.json sizes of Meta-Llama-3-8B and Meta-Llama-3-70B.
LLAMA3 = {
  "8b": {
    **_LLAMA3,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
  },
  "70b": {
    **_LLAMA3,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
  },
}
