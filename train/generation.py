"""Batched decoding with a KV cache for :class:`decoder_model.Decoder`, under one ``jit``.

:func:`init_cache` makes the cache the model writes keys and values into; :func:`generate`
left-aligns prompts of different lengths, runs them through the model once (prefill), then
one token per step in a ``lax.while_loop``, greedily or by sampling (temperature, top-k and
top-p filters as transformers' warpers), until every row has emitted a stop token. Pass
``apply_fn=lorax_fn.lora(model.apply)`` to generate with unmerged adapters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from decoder_config import DecoderConfig

if TYPE_CHECKING:  # decoder_model imports this module (it re-exports generate)
  from decoder_model import Decoder


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
    >>> from decoder_model import Decoder
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
