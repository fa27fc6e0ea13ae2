"""The offline default of ``configs/llm_offline.py``: a small decoder pre-trained here on real text.

``model.source = "pretrain:docs"`` needs no hub: :func:`prepare` builds the corpus of
``text_corpus`` (sentences of Python's documentation, a local BPE tokenizer with a chat
template, held-out sentences turned into a spelling-correction task), pre-trains a small
Qwen2-shaped decoder on the other sentences (plain next-token prediction, every weight
trained; ``COPY_SHARE`` of the sentences also as copy rows, written twice) and writes it as a
Hugging Face checkpoint, ``workdir/base_hf``, with the tokenizer beside it. From there the
job takes the path a real checkpoint takes: ``load_hf_decoder`` quantises it to NF4 on the
fly, and the PEFT export names it as its base. Both the corpus and the base are cached by their
settings, so a rerun or a resumed run skips them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import data as data_lib
import decoder as decoder_lib
import jax
import jax.numpy as jnp
import llm_data
import metrics as metrics_lib
import numpy as np
import optax
import text_corpus
from evaluation import xent

SOURCE = "pretrain:docs"
# The share of pre-training sentences also written as a copy row (sentence, newline, sentence):
# next-token prediction there rewards attention that looks back and copies (induction), which
# a prompted task that rewrites its input builds on. Generic: no errors, no instruction. Off:
# in the default's few hundred steps no share formed copying (README, the LLM job), and rows
# that teach nothing would only slow the pre-training down.
COPY_SHARE = 0.0
_SETTINGS = "lorax_fn_pretrain.json"  # beside the base's config.json: what it was trained with


@dataclasses.dataclass(frozen=True)
class Offline:
  """What :func:`prepare` made: the base checkpoint and the task's files.

  Attributes:
    base: a Hugging Face checkpoint directory (weights, config, tokenizer).
    train: JSONL correction pairs to fine-tune on.
    eval: JSONL correction pairs held out for evaluation.
  """

  base: str
  train: str
  eval: str


def prepare(config: Any, workdir: str) -> Offline:
  """The corpus and the pre-trained base of ``config.model.pretrain`` (cached in ``workdir``)."""
  pre = config.model.pretrain
  corpus_settings = {
    "seed": config.seed,
    "n_train": pre.task_train,
    "n_eval": pre.task_eval,
    "rate": pre.error_rate,
    "vocab_size": pre.vocab_size,
    "max_chars": pre.max_chars,
    "copies": COPY_SHARE,
  }
  corpus = _corpus(os.path.join(workdir, "corpus"), corpus_settings)
  base = os.path.join(workdir, "base_hf")
  settings = {"corpus": corpus_settings, "model": pre.to_dict()}
  if _read_json(os.path.join(base, _SETTINGS)) != settings:
    pretrain(config, corpus, base)
    with open(os.path.join(base, _SETTINGS), "w") as f:
      json.dump(settings, f, indent=2)
  return Offline(os.path.abspath(base), corpus.train, corpus.eval)


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # absent or half-written: built again
    return None


def _corpus(directory: str, settings: dict[str, Any]) -> text_corpus.OfflineCorpus:
  """``text_corpus.build_offline_corpus`` with these settings, unless already built."""
  stamp = os.path.join(directory, _SETTINGS)
  paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("pretrain", "train", "eval")}
  tokenizer = os.path.join(directory, "tokenizer")
  if _read_json(stamp) == settings:
    with open(paths["pretrain"]) as f:
      count = sum(1 for _ in f)
    return text_corpus.OfflineCorpus(**paths, tokenizer=tokenizer, num_pretrain=count)
  corpus = text_corpus.build_offline_corpus(directory, **settings)
  with open(stamp, "w") as f:
    json.dump(settings, f)
  return corpus


def decoder_config(pre: Any, vocab_size: int) -> decoder_lib.DecoderConfig:
  """A small Qwen2-shaped decoder (tied embeddings, q/k/v bias, GQA) of ``pre``'s sizes."""
  return decoder_lib.DecoderConfig(
    vocab_size=vocab_size,
    hidden_size=pre.hidden_size,
    intermediate_size=pre.intermediate_size,
    num_hidden_layers=pre.num_layers,
    num_attention_heads=pre.num_heads,
    num_key_value_heads=pre.num_kv_heads,
    head_dim=pre.hidden_size // pre.num_heads,
    rope_theta=10000.0,
    attention_bias=True,
    tie_word_embeddings=True,
    max_position_embeddings=pre.seq_len,
    model_type="qwen2",
  )


def pretrain(config: Any, corpus: text_corpus.OfflineCorpus, path: str) -> None:
  """Trains the decoder from scratch on the corpus' pre-training text; writes it to ``path``."""
  from transformers import AutoTokenizer

  pre = config.model.pretrain
  tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer)
  examples = llm_data.load_examples(corpus.pretrain, tokenizer, format="text", max_len=pre.seq_len)
  rows = llm_data.batches(
    examples, batch_size=pre.batch_size, max_len=pre.seq_len, seed=config.seed, train=True
  )
  epochs = math.ceil(pre.steps / len(rows))
  batches = llm_data.batches(
    examples,
    batch_size=pre.batch_size,
    max_len=pre.seq_len,
    seed=config.seed,
    train=True,
    epochs=epochs,
  )
  model = decoder_lib.Decoder(decoder_config(pre, len(tokenizer)))
  variables = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, 8), jnp.int32))
  schedule = optax.warmup_cosine_decay_schedule(0.0, pre.lr, max(pre.steps // 20, 1), pre.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

  @jax.jit
  def step(variables, opt_state, batch):
    def loss_fn(v):
      logits = model.apply(
        v, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
      )
      return xent(logits, batch["targets"], batch["loss_mask"])

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  opt_state = tx.init(variables)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  print(
    f"pre-training the offline base ({n:,} params, {pre.num_layers} layers of {pre.hidden_size}) "
    f"on {corpus.num_pretrain:,} rows of documentation text: {pre.steps} steps, {epochs} epochs"
  )
  losses, t0 = [], time.perf_counter()
  bar = metrics_lib.progress(pre.steps, 0, enabled=True)
  with bar:
    for _, batch in zip(range(pre.steps), data_lib.iterate(batches.dataset, 0, 0), strict=False):
      variables, opt_state, loss = step(variables, opt_state, batch)
      losses.append(loss)
      bar.update(1)
  tail = float(np.mean([float(x) for x in losses[-20:]]))
  print(
    f"pre-trained the base in {time.perf_counter() - t0:.0f} s: train loss {float(losses[0]):.3f}"
    f" -> {tail:.3f} (mean of the last 20 steps); written to {path}"
  )
  decoder_lib.save_hf_decoder(
    path, model, variables, tokenizer_from=corpus.tokenizer, overwrite=True
  )
