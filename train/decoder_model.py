"""A Flax linen decoder (Llama family, Qwen2) numerically equal to transformers' PyTorch models.

:class:`Decoder` follows ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` exactly: pre-RMSNorm blocks
(computed in float32), rotary position embeddings in the rotate-half convention (with Llama 3's
frequency scaling), grouped-query attention, a SwiGLU MLP, Qwen2's q/k/v bias, tied or untied
embeddings. Every linear layer is a plain 2-D ``nn.Dense`` named as transformers names the module,
so a PyTorch ``weight.T`` is our ``kernel`` and lorax_fn's default layouts apply. :func:`generate`
decodes batched prompts of different lengths with a KV cache, greedily or by sampling, under one
``jit``; pass ``apply_fn=lorax_fn.lora(model.apply)`` to generate with unmerged adapters.

The configuration lives in ``decoder_config``, generation and the KV cache in ``generation``,
parameter names and conversions in ``decoder_names``; their public names are re-exported here,
so callers import this one module.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from decoder_config import ARCHITECTURES, LLAMA3, ROPE_TYPES, DecoderConfig, RopeScaling
from decoder_names import (
  from_torch_state_dict,
  layouts,
  module_name,
  peft_modules,
  stack_layers,
  torch_keys,
  unstack_layers,
)
from generation import generate, init_cache

__all__ = [
  "ARCHITECTURES",
  "ROPE_TYPES",
  "MLP",
  "Attention",
  "Decoder",
  "DecoderConfig",
  "DecoderLayer",
  "RMSNorm",
  "RopeScaling",
  "LLAMA3",
  "from_torch_state_dict",
  "generate",
  "init_cache",
  "inv_freq",
  "layouts",
  "module_name",
  "peft_modules",
  "stack_layers",
  "torch_keys",
  "unstack_layers",
]

# transformers initialises linear and embedding weights with this standard deviation.
_INIT_STD = 0.02
# A finite "minus infinity": a row with every key masked (a padding query) stays finite.
_MASKED = float(np.finfo(np.float32).min)


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
