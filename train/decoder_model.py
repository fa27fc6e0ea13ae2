"""A Flax linen decoder (Llama family, Qwen2) numerically equal to transformers' PyTorch models.

:class:`Decoder` follows ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` exactly: pre-RMSNorm blocks
(computed in float32), rotary position embeddings in the rotate-half convention (with Llama 3's
frequency scaling), grouped-query attention, a SwiGLU MLP, Qwen2's q/k/v bias, tied or untied
embeddings. Every linear layer is a plain 2-D ``nn.Dense`` named as transformers names the module,
so a PyTorch ``weight.T`` is our ``kernel`` and lorax_fn's default layouts apply. :func:`generate`
decodes batched prompts of different lengths with a KV cache, greedily or by sampling, under one
``jit``; pass ``apply_fn=lorax_fn.lora(model.apply)`` to generate with unmerged adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# model_type -> the architecture transformers writes for it in config.json.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")
# transformers initialises linear and embedding weights with this standard deviation.
_INIT_STD = 0.02
# A finite "minus infinity": a row with every key masked (a padding query) stays finite.
_MASKED = float(np.finfo(np.float32).min)


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


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


def inv_freq(config: DecoderConfig) -> np.ndarray:
  """RoPE inverse frequencies ``(head_dim // 2,)`` in float32, computed as transformers does.

  Example:
    >>> c = DecoderConfig(11, 8, 12, 1, 2, 1, head_dim=4, rope_theta=100.0)
    >>> inv_freq(c).tolist()
    [1.0, 0.10000000149011612]
  """
  dim = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
  s = config.rope_scaling
  if s is None:
    return inv
  # transformers/modeling_rope_utils.py, _compute_llama3_parameters, in float32 throughout.
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_freq_wavelen, inv / s.factor, inv)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin ``(batch, seq, head_dim)`` in float32 for integer ``positions``."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding of ``x`` ``(batch, seq, heads, head_dim)``, rotate-half convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  """RMSNorm as transformers computes it: normalised in float32, then scaled.

  Attributes:
    eps: Added to the mean square.
    dtype: Compute (output) dtype.
    param_dtype: dtype of ``scale``.
  """

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def _dense(config: DecoderConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    kernel_init=nn.initializers.normal(_INIT_STD),
    name=name,
  )


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and an optional KV cache.

  Attributes:
    config: The architecture.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    layer_cache: dict[str, jax.Array] | None,
    cache_index: jax.Array | None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attends ``x`` ``(batch, seq, hidden)`` to itself, or to the cache with ``x`` written in.

    ``mask`` ``(batch, seq, keys)`` says which keys each query sees; with a cache, the keys
    are its slots and ``x`` is written at slots ``cache_index ...``.
    """
    c = self.config
    heads, kv_heads, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    b, t, _ = x.shape
    q = _dense(c, heads * hd, c.attention_bias, "q_proj")(x).reshape(b, t, heads, hd)
    k = _dense(c, kv_heads * hd, c.attention_bias, "k_proj")(x).reshape(b, t, kv_heads, hd)
    v = _dense(c, kv_heads * hd, c.attention_bias, "v_proj")(x).reshape(b, t, kv_heads, hd)
    q, k = _rotate(q, *rope), _rotate(k, *rope)
    new_cache = None
    if layer_cache is not None:
      at = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), at)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), at)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(c.dtype), v.astype(c.dtype)
    # Query head h uses key/value head h // groups, as transformers' repeat_kv.
    q = q.reshape(b, t, kv_heads, heads // kv_heads, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * hd**-0.5
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads * hd)
    return _dense(c, c.hidden_size, c.o_proj_bias, "o_proj")(out), new_cache


class MLP(nn.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

  Attributes:
    config: The architecture.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
    up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
    return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  Attributes:
    config: The architecture.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    layer_cache: dict[str, jax.Array] | None,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    cache_index: jax.Array | None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Applies the layer; returns ``(x, the layer's updated cache or None)`` (a scan step)."""
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    h, new_cache = Attention(c, name="self_attn")(
      norm("input_layernorm")(x), rope, mask, layer_cache, cache_index
    )
    x = x + h
    x = x + MLP(c, name="mlp")(norm("post_attention_layernorm")(x))
    return x, new_cache


def _attention_mask(
  q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array, k_slots: jax.Array
) -> jax.Array:
  """``(batch, queries, keys)``: causal over slots, within a segment, never to padding (0)."""
  causal = k_slots[None, :] <= q_slots[:, None]
  same = q_segments[:, :, None] == k_segments[:, None, :]
  return causal[None] & same & (k_segments[:, None, :] != 0)


class Decoder(nn.Module):
  """A causal language model equal to transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``.

  Attributes:
    config: The architecture and compute options.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = DecoderConfig(vocab_size=11, hidden_size=8, intermediate_size=12,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    ...                   head_dim=4)
    >>> model = Decoder(c)
    >>> ids = jnp.zeros((3, 5), jnp.int32)
    >>> variables = jax.eval_shape(model.init, jax.random.key(0), ids)  # shapes only
    >>> sorted(variables["params"])
    ['embed_tokens', 'layers_0', 'lm_head', 'norm']
    >>> jax.eval_shape(model.apply, variables, ids).shape
    (3, 5, 11)
  """

  config: DecoderConfig

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: dict[str, Any] | None = None,
    cache_index: jax.Array | int | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Next-token logits for every input token.

    Args:
      input_ids: ``(batch, seq)`` token ids.
      positions: ``(batch, seq)`` RoPE positions; default ``cache_index + arange(seq)``.
      segment_ids: ``(batch, seq)``; tokens attend only to earlier tokens of the same segment,
        and 0 marks padding, which nothing attends to. Default: one segment.
      cache: A KV cache from :func:`init_cache`; ``input_ids`` are written into it at slots
        ``cache_index ... cache_index + seq - 1`` and attend to every earlier slot.
      cache_index: The first cache slot to write (a scalar); default 0.

    Returns:
      Float32 logits ``(batch, seq, vocab)``; with a cache, ``(logits, updated cache)``.
    """
    c = self.config
    b, t = input_ids.shape
    start = 0 if cache_index is None else cache_index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    embed = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=nn.initializers.normal(_INIT_STD),
      name="embed_tokens",
    )
    x = embed(input_ids)
    rope = _rope_tables(c, positions)
    new_cache = None
    if cache is None:
      slots = jnp.arange(t)
      mask = _attention_mask(segment_ids, segment_ids, slots, slots)
    else:
      kv_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, start))
      slots = jnp.arange(kv_segments.shape[1])
      mask = _attention_mask(segment_ids, kv_segments, start + jnp.arange(t), slots)
      new_cache = {"segment_ids": kv_segments}
    x, layer_caches = self._layers(x, cache, rope, mask, start)
    x = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c, c.vocab_size, False, "lm_head")(x)
    # Float32 logits keep the softmax cross-entropy stable under bf16 compute.
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, {**new_cache, **layer_caches}

  def _layers(
    self,
    x: jax.Array,
    cache: dict[str, Any] | None,
    rope: tuple[jax.Array, jax.Array],
    mask: jax.Array,
    cache_index: Any,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Runs the layers, scanned or unrolled; returns x and the layers' updated caches."""
    c = self.config
    layer_cls = DecoderLayer
    if c.remat:
      # Under scan, CSE prevention is unnecessary and only costs speed.
      layer_cls = nn.remat(
        DecoderLayer,
        policy=jax.checkpoint_policies.nothing_saveable,
        prevent_cse=not c.scan_layers,
      )
    if c.scan_layers:
      # The cache keeps the batch axis first (lorax_fn's per-example adapters need it), so
      # its layer axis is axis 1.
      stack = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast),
        out_axes=1,
        length=c.num_hidden_layers,
      )
      layer_cache = None if cache is None else cache["layers"]
      x, new = stack(c, name="layers")(x, layer_cache, rope, mask, cache_index)
      return x, {} if cache is None else {"layers": new}
    caches = {}
    for i in range(c.num_hidden_layers):
      name = f"layers_{i}"
      layer_cache = None if cache is None else cache[name]
      x, caches[name] = layer_cls(c, name=name)(x, layer_cache, rope, mask, cache_index)
    return x, {} if cache is None else caches


def init_cache(config: DecoderConfig, batch: int, length: int, dtype: Any = None) -> dict:
  """An empty KV cache of ``length`` slots for :class:`Decoder`.

  Every leaf has the batch axis first: ``segment_ids`` ``(batch, length)`` (0: an empty slot)
  and per layer ``k``/``v`` ``(batch, length, kv_heads, head_dim)`` under ``layers_i``, or
  ``(batch, layers, length, kv_heads, head_dim)`` under ``layers`` for a scanned model.

  Args:
    config: The architecture.
    batch: Rows.
    length: Slots (prompt plus generated tokens).
    dtype: dtype of keys and values; default the compute dtype.

  Returns:
    The cache, for ``Decoder.__call__(..., cache=cache, cache_index=0)``.

  Example:
    >>> c = DecoderConfig(11, 8, 12, 2, 2, 1, head_dim=4, scan_layers=True)
    >>> init_cache(c, 3, 7)["layers"]["k"].shape
    (3, 2, 7, 1, 4)
  """
  dtype = config.dtype if dtype is None else dtype
  shape = (batch, length, config.num_key_value_heads, config.head_dim)
  if config.scan_layers:
    shape = (batch, config.num_hidden_layers, *shape[1:])
  kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  cache: dict[str, Any] = {"segment_ids": jnp.zeros((batch, length), jnp.int32)}
  if config.scan_layers:
    cache["layers"] = kv()
  else:
    cache.update({f"layers_{i}": kv() for i in range(config.num_hidden_layers)})
  return cache


# ------------------------------------------------------------------------------------------
# Parameter names: transformers' modules, PyTorch state dicts, LoRA layouts
# ------------------------------------------------------------------------------------------

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


def _abstract_params(config: DecoderConfig) -> Any:
  unrolled = dataclasses.replace(config, scan_layers=False)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(Decoder(unrolled).init, jax.random.key(0), ids)["params"]


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
  expected = _abstract_params(config)
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


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


def _left_pad(
  prompt_ids: Any, prompt_mask: Any, pad_id: int
) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
  """``(tokens, mask)`` as 2-D arrays; a ragged list of prompts is left-padded here."""
  if isinstance(prompt_ids, Sequence) and prompt_ids and isinstance(prompt_ids[0], Sequence):
    if prompt_mask is not None:
      raise ValueError("prompt_mask must be None when prompt_ids is a list of prompts")
    width = max(len(p) for p in prompt_ids)
    tokens = np.full((len(prompt_ids), width), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), width), np.int32)
    for i, p in enumerate(prompt_ids):
      if len(p):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    prompt_ids, prompt_mask = tokens, mask
  if np.ndim(prompt_ids) != 2:
    raise ValueError(f"prompt_ids must be (batch, length); got shape {np.shape(prompt_ids)}")
  if prompt_mask is None:
    prompt_mask = np.ones(np.shape(prompt_ids), np.int32)
  if np.shape(prompt_mask) != np.shape(prompt_ids):
    raise ValueError(
      f"prompt_mask must have the shape of prompt_ids {np.shape(prompt_ids)}; "
      f"got: {np.shape(prompt_mask)}"
    )
  try:
    rows = np.asarray(prompt_mask).sum(axis=1)
  except jax.errors.TracerArrayConversionError:  # traced: checked by whoever traces it
    rows = np.ones(1)
  empty = np.flatnonzero(rows == 0)
  if empty.size:
    raise ValueError(f"every prompt needs at least one token; rows {empty.tolist()} are empty")
  return prompt_ids, prompt_mask


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Top-k then top-p (nucleus) filtering, as transformers' warpers; others become -inf."""
  ordered = jnp.sort(logits, axis=-1)[..., ::-1]
  kth = jnp.take_along_axis(ordered, jnp.broadcast_to(top_k - 1, ordered.shape[:-1])[..., None], -1)
  ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
  kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True)
  nucleus = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
  # Rounding may count a token top-k removed into the nucleus; top-k still bounds it.
  threshold = jnp.maximum(nucleus, kth)
  return jnp.where(logits < threshold, -jnp.inf, logits)


@functools.partial(
  jax.jit,
  static_argnames=("model", "apply_fn", "max_new_tokens", "greedy"),
)
def _generate(
  variables: Any,
  tokens: jax.Array,
  mask: jax.Array,
  temperature: jax.Array,
  top_p: jax.Array,
  top_k: jax.Array,
  key: jax.Array,
  stop: jax.Array,
  pad_id: jax.Array,
  kwargs: dict[str, Any],
  *,
  model: Decoder,
  apply_fn: Callable[..., Any],
  max_new_tokens: int,
  greedy: bool,
) -> tuple[jax.Array, jax.Array]:
  b, width = tokens.shape
  # Left-align every prompt's tokens to the end, so all rows write the same cache slot.
  mask = mask.astype(jnp.int32)
  order = jnp.argsort(mask, axis=1, stable=True)
  mask = jnp.take_along_axis(mask, order, axis=1)
  tokens = jnp.where(mask == 1, jnp.take_along_axis(tokens, order, axis=1), pad_id)
  lengths = mask.sum(axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = init_cache(model.config, b, width + max_new_tokens)
  logits, cache = apply_fn(
    variables,
    tokens,
    positions=positions,
    segment_ids=mask,
    cache=cache,
    cache_index=jnp.int32(0),
    **kwargs,
  )

  def pick(logits: jax.Array, step: jax.Array) -> jax.Array:
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = _filter(logits / temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), filtered).astype(jnp.int32)

  def body(state: tuple) -> tuple:
    step, last, cache, out, done = state
    token = jnp.where(done, pad_id, pick(last, step))
    out = out.at[:, step].set(token)
    done = done | jnp.isin(token, stop)
    logits, cache = apply_fn(
      variables,
      token[:, None],
      positions=(lengths + step)[:, None],
      segment_ids=jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=width + step,
      **kwargs,
    )
    return step + 1, logits[:, -1], cache, out, done

  def cond(state: tuple) -> jax.Array:
    step, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  state = (jnp.int32(0), logits[:, -1], cache, out, done)
  _, _, _, out, _ = jax.lax.while_loop(cond, body, state)
  # Tokens up to and including the first stop token.
  stopped = jnp.isin(out, stop)
  first = jnp.where(stopped.any(axis=1), jnp.argmax(stopped, axis=1) + 1, max_new_tokens)
  return out, first


def generate(
  model: Decoder,
  variables: Any,
  prompt_ids: Any,
  *,
  max_new_tokens: int,
  prompt_mask: Any = None,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int | None = None,
  stop_tokens: Sequence[int] = (),
  pad_id: int = 0,
  key: jax.Array | None = None,
  apply_fn: Callable[..., Any] | None = None,
  return_lengths: bool = False,
  **kwargs: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Continues batched prompts of different lengths with a KV cache, under one ``jit``.

  The prompts are left-aligned to their ends (so every row writes the same cache slot), run
  through the model once (prefill), then one token per step in a ``lax.while_loop`` that ends
  when every row has emitted a stop token or ``max_new_tokens`` are out. A row that stopped
  emits ``pad_id``. Compiled once per model, ``apply_fn``, ``max_new_tokens``, greedy or
  sampling, and argument shapes: build ``apply_fn`` once (``lorax_fn.lora(model.apply)``
  makes a new function, so a new compilation, each time it is called).

  Args:
    model: The decoder.
    variables: ``{"params": ...}``; with ``apply_fn=lorax_fn.lora(model.apply)`` the params
      may hold LoRA, quantised or stacked leaves.
    prompt_ids: ``(batch, length)`` token ids, padded anywhere ``prompt_mask`` says, or a list
      of token lists of different lengths.
    max_new_tokens: Tokens to generate per row.
    prompt_mask: ``(batch, length)``, 1 for prompt tokens, 0 for padding; default all ones.
    temperature: 0 for greedy decoding; otherwise the softmax temperature of sampling.
    top_p: Sample from the smallest set of most likely tokens with this much probability.
    top_k: Sample from the ``top_k`` most likely tokens; ``None`` for all.
    stop_tokens: Token ids that end a row (they are emitted, then ``pad_id``).
    pad_id: Emitted by rows that have stopped.
    key: PRNG key; required when sampling (``temperature > 0``).
    apply_fn: Called as ``model.apply`` is (the default); e.g. ``lorax_fn.lora(model.apply)``.
    return_lengths: Also return each row's number of generated tokens (stop token included).
    **kwargs: Passed on to every ``apply_fn`` call (e.g. ``adapter_ids=`` for stacked
      adapters).

  Returns:
    ``(batch, max_new_tokens)`` int32 tokens, and the lengths ``(batch,)`` if asked for.

  Raises:
    ValueError: A bad option (named), an empty prompt, or sampling without a key.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> c = DecoderConfig(11, 8, 12, 1, 2, 1, head_dim=4)
    >>> model = Decoder(c)
    >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> out = generate(model, variables, [[1, 2, 3], [4]], max_new_tokens=4)
    >>> out.shape, out.dtype
    ((2, 4), dtype('int32'))
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int; got: {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy); got: {temperature!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1]; got: {top_p!r}")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be None or a positive int; got: {top_k!r}")
  greedy = temperature == 0
  if not greedy and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=")
  # Stop tokens are data, padded with -1 (never a token) to a multiple of 8 entries, so a
  # new set of them rarely recompiles.
  stop = [int(t) for t in stop_tokens]
  size = 8 * max(1, -(-len(stop) // 8))
  stop += [-1] * (size - len(stop))
  tokens, mask = _left_pad(prompt_ids, prompt_mask, pad_id)
  out, lengths = _generate(
    variables,
    jnp.asarray(tokens, jnp.int32),
    jnp.asarray(mask),
    jnp.float32(max(temperature, 1e-6)),
    jnp.float32(top_p),
    jnp.int32(min(top_k or model.config.vocab_size, model.config.vocab_size)),
    jax.random.key(0) if key is None else key,
    jnp.asarray(stop, jnp.int32),
    jnp.int32(pad_id),
    kwargs,
    model=model,
    apply_fn=model.apply if apply_fn is None else apply_fn,
    max_new_tokens=max_new_tokens,
    greedy=greedy,
  )
  return (out, lengths) if return_lengths else out
