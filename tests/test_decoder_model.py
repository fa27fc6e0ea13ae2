"""Tests for the Flax decoder and generation in ``train/decoder_model.py`` and ``generation.py``.

Every numeric check is against transformers' PyTorch ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
built on the CPU from tiny random configs with pairwise-distinct sizes (hidden 48, heads 4 of
width 10, 2 KV heads, MLP 72, vocab 101), converted with ``from_torch_state_dict``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import decoder_model as dm
import generation
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize

import lorax_fn as lora_fn

torch = pytest.importorskip("torch", reason="interop extra not installed")
transformers = pytest.importorskip("transformers", reason="interop extra not installed")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS = 101, 48, 4, 2, 10, 72, 2
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  # Short, so the tiny head's wavelengths fall in all three llama3 bands.
  "original_max_position_embeddings": 64,
}
CASES = {
  # GQA, Llama 3 rope scaling, untied head, explicit head_dim != hidden / heads.
  "llama3": ("llama", dict(rope_theta=1e4, rope_scaling=dict(LLAMA3), max_position_embeddings=128)),
  # Tied embeddings, q/k/v bias, no o bias.
  "qwen2": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True)),
  # Tied embeddings, q/k/v/o bias, MLP bias.
  "llama_bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
}


def _torch_model(case: str):
  model_type, extra = CASES[case]
  cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  config = cls(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=MLP,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    # Wide logits: greedy choices far apart, so 1e-6 numeric noise never flips them.
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
    **extra,
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():  # norms and biases off their init values too
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model


@functools.cache
def _case(case: str, **options):
  """``(torch model, our model, our params)`` for a case; built once per process."""
  torch_model = _torch_model(case)
  config = dm.DecoderConfig.from_hf(torch_model.config.to_dict(), **options)
  params = dm.from_torch_state_dict(torch_model.state_dict(), config)
  return torch_model, dm.Decoder(config), params


@functools.cache
def _jit(fn):
  """``jax.jit(fn)``, one per model: compiled programs are shared between tests."""
  return jax.jit(fn)


@functools.cache
def _lora_apply(model):
  """``jax.jit(lorax_fn.lora(model.apply))``, one per model."""
  return jax.jit(lora_fn.lora(model.apply))


def _torch_logits(torch_model, ids, mask=None):
  with torch.no_grad():
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(np.asarray(mask))}
    return torch_model(torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


def _ids(shape, seed=0):
  return np.random.RandomState(seed).randint(1, VOCAB, shape).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_config_from_hf(case):
  torch_model = _torch_model(case)
  config = dm.DecoderConfig.from_hf(torch_model.config.to_dict())
  model_type, extra = CASES[case]
  assert config.model_type == model_type
  assert (config.head_dim, config.num_key_value_heads) == (HEAD_DIM, KV_HEADS)
  assert config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
  assert config.attention_bias == (model_type == "qwen2" or "attention_bias" in extra)
  assert config.o_proj_bias == ("attention_bias" in extra)


def test_config_reads_both_rope_spellings():
  base = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=MLP,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=128,
  )
  old = dm.DecoderConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": LLAMA3})
  new = dm.DecoderConfig.from_hf({**base, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}})
  assert old == new and old.rope_theta == 5e5
  assert old.rope_scaling == dm.RopeScaling(8.0, 1.0, 4.0, 64)
  assert (old.head_dim, old.num_key_value_heads) == (HIDDEN // HEADS, HEADS)  # the defaults
  # original_max_position_embeddings falls back to max_position_embeddings, as transformers.
  no_original = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
  c = dm.DecoderConfig.from_hf({**base, "rope_scaling": no_original})
  assert c.rope_scaling.original_max_position_embeddings == 128
  legacy = dm.DecoderConfig.from_hf({**base, "rope_scaling": {"type": "default"}})
  assert legacy.rope_scaling is None and legacy.rope_theta == 10000.0


def test_inv_freq_matches_transformers():
  torch_model = _torch_model("llama3")
  config = dm.DecoderConfig.from_hf(torch_model.config.to_dict())
  theirs = torch_model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(dm.inv_freq(config), theirs, rtol=1e-6)
  # All three llama3 bands are exercised: kept, divided by factor, and interpolated.
  plain = dm.inv_freq(dataclasses.replace(config, rope_scaling=None))
  ratio = plain / dm.inv_freq(config)
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
  assert ((ratio > 1.01) & (ratio < 7.99)).any()


_CONFIG = dict(
  model_type="llama",
  vocab_size=11,
  hidden_size=8,
  intermediate_size=12,
  num_hidden_layers=1,
  num_attention_heads=2,
)

CONFIG_ERRORS = [
  ("model_type", dict(model_type="mistral"), ValueError, r"model_type 'mistral'.*supported.*qwen2"),
  (
    "architectures",
    dict(architectures=["Qwen2ForCausalLM"]),
    ValueError,
    r"architectures \['Qwen2ForCausalLM'\].*'llama' \(LlamaForCausalLM\)",
  ),
  ("rope_type", dict(rope_scaling={"rope_type": "yarn"}), ValueError, r"rope_type 'yarn'"),
  ("rope_type_new", dict(rope_parameters={"rope_type": "dynamic"}), ValueError, "'dynamic'"),
  ("llama3_keys", dict(rope_scaling={"rope_type": "llama3"}), ValueError, r"missing: \['factor'"),
  ("activation", dict(hidden_act="gelu"), ValueError, "hidden_act must be 'silu'"),
  ("sliding", dict(model_type="qwen2", use_sliding_window=True), ValueError, "sliding-window"),
  ("missing", dict(vocab_size=None), ValueError, "config.json has no 'vocab_size'"),
  ("gqa", dict(num_key_value_heads=3, num_attention_heads=4), ValueError, "must divide"),
  ("partial", dict(partial_rotary_factor=0.5), ValueError, "partial_rotary_factor must be 1.0"),
]


@pytest.mark.parametrize(
  "name, change, error, match", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors(name, change, error, match):
  config = {k: v for k, v in {**_CONFIG, **change}.items() if v is not None}
  with pytest.raises(error, match=match):
    dm.DecoderConfig.from_hf(config)


def test_config_option_errors():
  with pytest.raises(ValueError, match=r"unknown options \['scan'\]"):
    dm.DecoderConfig.from_hf(_CONFIG, scan=True)
  with pytest.raises(TypeError, match="config must be the dict"):
    dm.DecoderConfig.from_hf("config.json")


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
  torch_model, model, params = _case(case)
  ids = _ids((2, 9))
  ours = _jit(model.apply)({"params": params}, jnp.asarray(ids))
  assert ours.dtype == jnp.float32 and ours.shape == (2, 9, VOCAB)
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-5, rtol=0)


def test_params_names_and_shapes():
  _, _, params = _case("qwen2")
  layer = jax.tree.map(jnp.shape, params["layers_1"])
  assert layer["self_attn"] == {
    "q_proj": {"kernel": (HIDDEN, HEADS * HEAD_DIM), "bias": (HEADS * HEAD_DIM,)},
    "k_proj": {"kernel": (HIDDEN, KV_HEADS * HEAD_DIM), "bias": (KV_HEADS * HEAD_DIM,)},
    "v_proj": {"kernel": (HIDDEN, KV_HEADS * HEAD_DIM), "bias": (KV_HEADS * HEAD_DIM,)},
    "o_proj": {"kernel": (HEADS * HEAD_DIM, HIDDEN)},
  }
  assert layer["mlp"] == {
    "gate_proj": {"kernel": (HIDDEN, MLP)},
    "up_proj": {"kernel": (HIDDEN, MLP)},
    "down_proj": {"kernel": (MLP, HIDDEN)},
  }
  assert sorted(params) == ["embed_tokens", "layers_0", "layers_1", "norm"]  # tied: no lm_head
  assert "lm_head" in _case("llama3")[2]
  # Freshly initialised params have the loaded ones' structure.
  init = _case("qwen2")[1].init
  fresh = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, params)


def test_scan_and_remat_match_unrolled():
  _, model, params = _case("llama3")
  ids = jnp.asarray(_ids((2, 9)))
  stacked = dm.stack_layers(params, LAYERS)
  assert dm.unstack_layers(stacked, LAYERS).keys() == params.keys()
  scanned = dm.Decoder(dataclasses.replace(model.config, scan_layers=True))
  want = _jit(model.apply)({"params": params}, ids)
  np.testing.assert_allclose(_jit(scanned.apply)({"params": stacked}, ids), want, atol=1e-5, rtol=0)

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 0])

  # Rematerialised (and scanned) layers give the same gradients as plain ones.
  both = dm.Decoder(dataclasses.replace(model.config, scan_layers=True, remat=True))
  want_grad = jax.jit(jax.grad(functools.partial(loss, model)))(params)
  grad = jax.jit(jax.grad(functools.partial(loss, both)))(stacked)
  for g, w in zip(
    jax.tree.leaves(dm.unstack_layers(grad, LAYERS)), jax.tree.leaves(want_grad), strict=True
  ):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_bf16_compute_close():
  _, model, params = _case("qwen2")
  ids = jnp.asarray(_ids((2, 9)))
  bf16 = dm.Decoder(dataclasses.replace(model.config, dtype=jnp.bfloat16))
  got = _jit(bf16.apply)({"params": params}, ids)
  assert got.dtype == jnp.float32
  want = _jit(model.apply)({"params": params}, ids)
  assert float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())


def test_packed_and_padded_rows_equal_each_sequence_alone():
  torch_model, model, params = _case("llama3")
  a, b, c = _ids((1, 4), 1)[0], _ids((1, 3), 2)[0], _ids((1, 6), 3)[0]
  # Row 0: a and b packed, then 2 pads; row 1: c right-padded by 3.
  ids = np.zeros((2, 9), np.int32)
  ids[0, :7], ids[1, :6] = np.concatenate([a, b]), c
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0]])
  positions = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0, 0]])
  got = _jit(model.apply)({"params": params}, ids, positions=positions, segment_ids=segments)
  assert np.isfinite(np.asarray(got)).all()  # padding queries see no key, and stay finite
  for row, start, seq in ((0, 0, a), (0, 4, b), (1, 0, c)):
    want = _torch_logits(torch_model, seq[None])[0]
    np.testing.assert_allclose(got[row, start : start + len(seq)], want, atol=1e-5, rtol=0)


def test_cache_prefill_and_steps_equal_full_forward():
  _, model, params = _case("qwen2")
  ids = jnp.asarray(_ids((2, 9)))
  want = _jit(model.apply)({"params": params}, ids)
  # Unrolled models use the cache in every generate test; a scanned one is checked here.
  for config in (dataclasses.replace(model.config, scan_layers=True),):
    p = dm.stack_layers(params, LAYERS)
    cache = dm.init_cache(config, 2, 11)
    apply = _jit(dm.Decoder(config).apply)
    first, cache = apply({"params": p}, ids[:, :5], cache=cache, cache_index=0)
    steps = [first]
    for i in range(5, 9):
      logits, cache = apply({"params": p}, ids[:, i : i + 1], cache=cache, cache_index=i)
      steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), want, atol=1e-5, rtol=0)
    assert cache["segment_ids"].tolist() == [[1] * 9 + [0] * 2] * 2


def test_from_torch_state_dict_errors():
  torch_model, model, _ = _case("llama3")
  state = dict(torch_model.state_dict())
  with pytest.raises(ValueError, match="missing key 'model.norm.weight'"):
    dm.from_torch_state_dict(
      {k: v for k, v in state.items() if k != "model.norm.weight"}, model.config
    )
  bad = {**state, "model.layers.1.mlp.up_proj.weight": np.zeros((MLP, HIDDEN + 1), np.float32)}
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(49, 72\)"):
    dm.from_torch_state_dict(bad, model.config)
  with pytest.raises(ValueError, match=r"keys the model lacks: \['extra.weight'\]"):
    dm.from_torch_state_dict({**state, "extra.weight": np.zeros(1)}, model.config)


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 9, 10, 12]]
NEW = 7


def _torch_generate(torch_model, prompts, **kwargs):
  """transformers' generate on left-padded prompts; returns the new tokens only."""
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = torch_model.generate(
      input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kwargs
    )
  return out[:, width:].numpy()


@pytest.mark.parametrize("case", ["llama3", "qwen2"])
def test_greedy_matches_transformers(case):
  torch_model, model, params = _case(case)
  ours = dm.generate(model, {"params": params}, PROMPTS, max_new_tokens=NEW)
  want = _torch_generate(torch_model, PROMPTS, do_sample=False)
  np.testing.assert_array_equal(ours, want)


def test_prompt_mask_any_padding_equals_lists():
  _, model, params = _case("llama3")
  want = dm.generate(model, {"params": params}, PROMPTS, max_new_tokens=NEW)
  # The same prompts right-padded, with a mask: moved to the left inside generate.
  ids = np.zeros((3, 5), np.int32)
  mask = np.zeros((3, 5), np.int32)
  for i, p in enumerate(PROMPTS):
    ids[i, : len(p)], mask[i, : len(p)] = p, 1
  got = dm.generate(model, {"params": params}, ids, prompt_mask=mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(got, want)


def test_stop_tokens_end_rows_as_transformers():
  torch_model, model, params = _case("llama3")
  greedy = np.asarray(dm.generate(model, {"params": params}, PROMPTS, max_new_tokens=NEW))
  stop = int(greedy[0, 2])  # row 0 stops after 3 tokens; other rows where it appears
  got, lengths = dm.generate(
    model,
    {"params": params},
    PROMPTS,
    max_new_tokens=NEW,
    stop_tokens=(stop, 1000),
    pad_id=0,
    return_lengths=True,
  )
  want = _torch_generate(torch_model, PROMPTS, do_sample=False, eos_token_id=[stop])
  got = np.asarray(got)
  np.testing.assert_array_equal(got[:, : want.shape[1]], want)
  assert (got[:, want.shape[1] :] == 0).all()
  assert lengths[0] == 3 and got[0, 2] == stop and (got[0, 3:] == 0).all()
  for row, n in enumerate(np.asarray(lengths)):
    hits = np.flatnonzero(greedy[row] == stop)
    assert n == (hits[0] + 1 if hits.size else NEW)


def _nucleus(logits: np.ndarray, top_p: float) -> set[int]:
  order = np.argsort(-logits)
  probs = np.exp(logits[order] - logits.max())
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  return set(order[before < top_p].tolist())


def test_filter_keeps_top_p_and_top_k_sets():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = jnp.asarray(np.log(probs), jnp.float32)[None]
  filtered = jax.jit(generation._filter)
  kept = lambda k, p: set(np.flatnonzero(np.isfinite(filtered(logits, k, p)[0])).tolist())
  assert kept(4, 0.4) == {1}
  assert kept(4, 0.7) == {1, 3}
  assert kept(4, 0.85) == {1, 3, 2}
  assert kept(4, 1.0) == {0, 1, 2, 3}
  assert kept(2, 1.0) == {1, 3}
  assert kept(1, 1.0) == {1}
  samples = jax.random.categorical(jax.random.key(0), filtered(logits, 4, 0.7), shape=(4000, 1))
  counts = np.bincount(np.asarray(samples).ravel(), minlength=4)
  assert counts[0] == counts[2] == 0
  np.testing.assert_allclose(counts[[1, 3]] / 4000, [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_sampling_reproducible_and_within_top_p():
  _, model, params = _case("llama3")
  variables = {"params": params}
  sample = functools.partial(
    dm.generate, model, variables, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_p=0.6
  )
  a, b = np.asarray(sample(key=jax.random.key(1))), sample(key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sample(key=jax.random.key(2)))
  # Every sampled token lies in the nucleus of the tempered logits that produced it.
  width = max(map(len, PROMPTS))
  ids = np.array([[0] * (width - len(p)) + p for p in PROMPTS])
  mask = (np.arange(width)[None] >= width - np.array([len(p) for p in PROMPTS])[:, None]) * 1
  full = np.concatenate([ids, np.asarray(a)], axis=1)
  seg = np.concatenate([mask, np.ones_like(a)], axis=1)
  logits = _jit(model.apply)(
    variables, full, positions=np.maximum(np.cumsum(seg, 1) - 1, 0), segment_ids=seg
  )
  logits = np.asarray(logits) / 2.0
  for row in range(len(PROMPTS)):
    for t in range(NEW):
      assert a[row, t] in _nucleus(logits[row, width + t - 1], 0.6), (row, t)
  # top_k=1 (and a tiny top_p) sample the argmax: greedy decoding.
  greedy = dm.generate(model, variables, PROMPTS, max_new_tokens=NEW)
  np.testing.assert_array_equal(sample(key=jax.random.key(3), top_k=1), greedy)
  np.testing.assert_array_equal(sample(key=jax.random.key(3), top_p=1e-6), greedy)


GENERATE_ERRORS = [
  ("max_new_tokens", dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
  ("temperature", dict(temperature=-1.0), "temperature must be >= 0"),
  ("top_p", dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
  ("top_k", dict(top_k=0), "top_k must be None or a positive int"),
  ("no_key", dict(temperature=0.5), "needs a PRNG key"),
  ("empty", dict(prompt_ids=[[1, 2], []]), r"rows \[1\] are empty"),
  ("mask_shape", dict(prompt_mask=np.ones((2, 3))), "prompt_mask must have the shape"),
  ("ndim", dict(prompt_ids=np.ones(3, np.int32)), r"prompt_ids must be \(batch, length\)"),
  ("ragged_mask", dict(prompt_ids=[[1], [2, 3]], prompt_mask=np.ones((2, 2))), "must be None"),
]


@pytest.mark.parametrize(
  "name, change, match", GENERATE_ERRORS, ids=[e[0] for e in GENERATE_ERRORS]
)
def test_generate_errors(name, change, match):
  _, model, params = _case("llama3")
  kwargs = {"prompt_ids": np.ones((2, 4), np.int32), "max_new_tokens": 3, **change}
  with pytest.raises(ValueError, match=match):
    dm.generate(model, {"params": params}, kwargs.pop("prompt_ids"), **kwargs)


# ------------------------------------------------------------------------------------------
# LoRA, QLoRA, many adapters, PEFT
# ------------------------------------------------------------------------------------------


def _wrapped(params, seed, **kwargs):
  wrapped = lora_fn.wrap(params, rank=4, targets=ATTN, key=jax.random.key(seed), **kwargs)
  return randomize(wrapped, jax.random.key(seed + 100), scale=0.3)


def test_lora_unmerged_generation_equals_merged():
  _, model, params = _case("llama3")
  wrapped = _wrapped(params, 0)
  apply = lora_fn.lora(model.apply)
  ids = jnp.asarray(_ids((2, 9)))
  merged = lora_fn.merge(wrapped)
  np.testing.assert_allclose(  # float32: W·x + s·B(A·x) and (W + s·BA)·x round apart
    _lora_apply(model)({"params": wrapped}, ids),
    _jit(model.apply)({"params": merged}, ids),
    rtol=1e-5,
    atol=3e-5,
  )
  got = dm.generate(model, {"params": wrapped}, PROMPTS, max_new_tokens=NEW, apply_fn=apply)
  want = dm.generate(model, {"params": merged}, PROMPTS, max_new_tokens=NEW)
  np.testing.assert_array_equal(got, want)
  base = dm.generate(model, {"params": params}, PROMPTS, max_new_tokens=NEW)
  assert not np.array_equal(got, base)  # the adapter changes what is generated


def test_lora_on_scanned_params_with_layouts():
  _, model, params = _case("llama3")
  scanned = dm.Decoder(dataclasses.replace(model.config, scan_layers=True))
  stacked = dm.stack_layers(params, LAYERS)
  found = dm.layouts(stacked)
  assert found["layers/self_attn/q_proj/kernel"] == ("stack", "in", "out")
  assert len(found) == 7 and "lm_head/kernel" not in found
  wrapped = _wrapped(stacked, 0, layouts=found)
  assert wrapped["layers"]["self_attn"]["o_proj"]["kernel"].roles == ("stack", "in", "out")
  ids = jnp.asarray(_ids((2, 9)))
  got = _lora_apply(scanned)({"params": wrapped}, ids)
  want = _jit(scanned.apply)({"params": lora_fn.merge(wrapped)}, ids)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_qlora_nf4_generates_as_the_merged_dequantised_model():
  _, model, params = _case("qwen2")
  targets = (*ATTN, "gate_proj", "up_proj", "down_proj")
  quantized = lora_fn.quantize(params, "nf4", targets=targets)
  assert lora_fn.is_quant(quantized["layers_0"]["mlp"]["up_proj"]["kernel"])
  got = dm.generate(
    model,
    {"params": _wrapped(quantized, 0)},
    PROMPTS,
    max_new_tokens=NEW,
    apply_fn=lora_fn.lora(model.apply),
  )
  dequantized = jax.tree.map(
    lambda x: x.dequantize() if lora_fn.is_quant(x) else x, quantized, is_leaf=lora_fn.is_quant
  )
  merged = lora_fn.merge(_wrapped(dequantized, 0))
  want = dm.generate(model, {"params": merged}, PROMPTS, max_new_tokens=NEW)
  np.testing.assert_array_equal(got, want)


def test_per_example_adapters_generate_as_each_alone():
  _, model, params = _case("llama3")
  first, second = _wrapped(params, 1), _wrapped(params, 2)
  stacked = lora_fn.stack_adapters([first, second])
  ids = jnp.asarray([0, 1, -1], jnp.int32)
  got = dm.generate(
    model,
    {"params": stacked},
    PROMPTS,
    max_new_tokens=NEW,
    apply_fn=lora_fn.lora(model.apply),
    adapter_ids=ids,
  )
  for row, p in enumerate((lora_fn.merge(first), lora_fn.merge(second), params)):
    want = dm.generate(model, {"params": p}, PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(got[row], want[row])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_round_trip_with_transformers(tmp_path):
  peft = pytest.importorskip("peft", reason="interop extra not installed")
  _, model, params = _case("llama3")
  wrapped = _wrapped(params, 0)
  modules = dm.peft_modules(wrapped)
  assert modules["layers_1/self_attn/q_proj"] == "model.layers.1.self_attn.q_proj"
  assert modules["embed_tokens"] == "model.embed_tokens" and modules["lm_head"] == "lm_head"
  lora_fn.save_peft(tmp_path / "peft", wrapped, modules=modules, task_type="CAUSAL_LM")
  ids = _ids((2, 9))
  ours = _lora_apply(model)({"params": wrapped}, jnp.asarray(ids))
  theirs = peft.PeftModel.from_pretrained(_torch_model("llama3"), tmp_path / "peft").eval()
  np.testing.assert_allclose(ours, _torch_logits(theirs, ids), atol=1e-5, rtol=0)
  # The same adapter read onto scanned params: one PyTorch module per layer of the stack.
  scanned = dm.Decoder(dataclasses.replace(model.config, scan_layers=True))
  stacked = dm.stack_layers(params, LAYERS)
  modules = dm.peft_modules(stacked)
  assert modules["layers/mlp/down_proj"] == "model.layers.{}.mlp.down_proj"
  loaded = lora_fn.load_peft(
    tmp_path / "peft", stacked, modules=modules, layouts=dm.layouts(stacked)
  )
  got = _lora_apply(scanned)({"params": loaded}, jnp.asarray(ids))
  np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)
