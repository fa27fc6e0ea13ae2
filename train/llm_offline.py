"""The offline default of ``configs/llm_offline.py``: a small decoder pre-trained here on real text.

``model.source = "pretrain:docs"`` needs no hub: :func:`prepare` builds the corpus of
``text_corpus`` (sentences of Python's documentation, a local BPE tokenizer with a chat
template, held-out sentences turned into a spelling-correction task), pre-trains a small
Qwen2-shaped decoder and writes it as a Hugging Face checkpoint, ``workdir/base_hf``, with the
tokenizer beside it. From there the job takes the path a real checkpoint takes:
``load_hf_decoder`` quantises it to NF4 on the fly, and the PEFT export names it as its base.
Both the corpus and the base are cached by their settings, so a rerun or a resumed run skips them.

Pre-training is next-token prediction, every weight trained, in two phases:

1. ``copy_steps`` steps on *copy rows* of random tokens (a random prefix, a random sequence, a
   newline, the same sequence again), the loss on the copy alone: the copy is predictable only
   by copying, and the prefix moves the sequence away from the row's start, so copying by
   position alone does not work; copying forms in 350 to 400 steps (seeds 0 to 3).
2. The remaining steps on the documentation's sentences, ``copy_share`` of them also written as
   copy rows (the sentence among one or two others, a newline, the sentence again), so the
   copying carries over to real text while the model learns its words.

Copy rows whose copy sits at a fixed place (the row's start, or just before the newline) teach
copying from that place instead, which fails where the task's input sits between the
instruction's lines: some seeds' tuning then never finds the copy (measured: README, the LLM
job). Rewriting a misspelt sentence is mostly copying it, so a base that copies gives the
tuning something to build on. No phase sees a held-out sentence, an error or the instruction.
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
COPY_LENGTHS = (6, 30)  # a random copy row's sequence has this many tokens (upper exclusive)
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
    "copies": pre.copy_share,
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
      rows = [json.loads(line)["text"] for line in f]
    copies = sum(text_corpus.COPY_SEPARATOR in row for row in rows)  # sentences have no newline
    return text_corpus.OfflineCorpus(
      **paths, tokenizer=tokenizer, num_pretrain=len(rows), num_copies=copies
    )
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


def random_copy_rows(
  count: int, *, token_ids: np.ndarray, separator: list[int], eos: int, seed: int
) -> list[llm_data.Example]:
  """``count`` copy rows of random tokens: a prefix, ``x``, ``separator``, ``x`` again, EOS.

  Each ``x`` has ``COPY_LENGTHS`` tokens drawn uniformly from ``token_ids``, so nothing but its
  first occurrence predicts its second: the rows reward copying and nothing else. The prefix,
  up to ``COPY_LENGTHS[1] - 1`` random tokens, moves ``x`` away from the row's start, so
  copying by position alone does not work: the model has to find ``x`` by what it holds (as
  induction heads do: attend to what followed the previous occurrence of the current token).
  The loss is on the copy alone (``x`` again and EOS): the rest is unpredictable by
  construction, and its loss only adds noise to the copying's gradient, which delayed copying
  from forming by hundreds of steps, and on some seeds for more than 1,600 steps.

  Example:
    >>> rows = random_copy_rows(2, token_ids=np.arange(4, 9), separator=[1], eos=0, seed=0)
    >>> r = rows[0].input_ids
    >>> at = int(np.flatnonzero(r == 1)[0])  # the separator
    >>> n = len(r) - at - 2  # the copy, before EOS
    >>> bool((r[at - n : at] == r[at + 1 : at + 1 + n]).all()), int(r[-1]), 6 <= n < 30
    (True, 0, True)
    >>> int(rows[0].loss_mask.sum()) == n + 1, bool(rows[0].loss_mask[at + 1 :].all())
    (True, True)
  """
  rng = np.random.default_rng([seed, 3])
  rows = []
  for i in range(count):
    prefix = rng.choice(token_ids, size=int(rng.integers(COPY_LENGTHS[1]))).tolist()
    x = rng.choice(token_ids, size=int(rng.integers(*COPY_LENGTHS))).tolist()
    ids = np.asarray(prefix + x + separator + x + [eos], np.int32)
    copy = np.arange(len(ids)) >= len(prefix) + len(x) + len(separator)
    rows.append(llm_data.Example(ids, copy.astype(np.int32), 0, "", i + 1))
  return rows


def copy_losses(
  model: Any,
  variables: Any,
  sentences: list[list[int]],
  separator: list[int],
  *,
  before: list[list[int]] | None = None,
) -> tuple[float, float]:
  """Mean next-token loss on the first and on the copied half of ``sentence, separator, sentence``.

  Each row starts with its ``before`` tokens (none by default), which neither half counts: a
  model that copies only by position copies a sentence that starts its row, not one after other
  text. The first token of each half is left out (nothing predicts it). A model that copies has
  a far lower loss on the second half; one that does not has about the same on both.
  """
  before = before if before is not None else [[] for _ in sentences]
  rows = [b + s + separator + s for b, s in zip(before, sentences, strict=True)]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
  first, second = np.zeros(ids.shape, np.float32), np.zeros(ids.shape, np.float32)
  for i, (b, s, row) in enumerate(zip(before, sentences, rows, strict=True)):
    ids[i, : len(row)] = row
    first[i, len(b) + 1 : len(b) + len(s)] = 1
    second[i, len(b) + len(s) + len(separator) + 1 : len(row)] = 1
  logits = jax.jit(model.apply)(variables, ids[:, :-1])
  return tuple(float(xent(logits, ids[:, 1:], m[:, 1:])) for m in (first, second))


def pretrain(config: Any, corpus: text_corpus.OfflineCorpus, path: str) -> None:
  """Trains the decoder from scratch (the two phases above); writes it to ``path``."""
  from transformers import AutoTokenizer

  pre = config.model.pretrain
  tokenizer = AutoTokenizer.from_pretrained(corpus.tokenizer)
  encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  separator = encode(text_corpus.COPY_SEPARATOR)
  text = llm_data.load_examples(corpus.pretrain, tokenizer, format="text", max_len=pre.seq_len)
  plan = lambda examples, epochs: llm_data.batches(
    examples,
    batch_size=pre.batch_size,
    max_len=pre.seq_len,
    seed=config.seed,
    train=True,
    epochs=epochs,
  )
  phases = []  # (batches, steps)
  if pre.copy_steps:
    # The mean row: prefix, twice x, separator, EOS; 10% more rows than the steps fill.
    mean_len = (COPY_LENGTHS[1] - 1) / 2 + sum(COPY_LENGTHS) - 1 + len(separator) + 1
    count = int(pre.copy_steps * pre.batch_size * pre.seq_len / mean_len * 1.1) + pre.batch_size
    special = set(tokenizer.all_special_ids)
    rows = random_copy_rows(
      count,
      token_ids=np.array([i for i in range(len(tokenizer)) if i not in special]),
      separator=separator,
      eos=tokenizer.eos_token_id,
      seed=config.seed,
    )
    phases.append((plan(rows, 1), pre.copy_steps))
  text_steps = pre.steps - pre.copy_steps
  phases.append((plan(text, math.ceil(text_steps / len(plan(text, 1).dataset))), text_steps))
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
    f"pre-training the offline base ({n:,} params, {pre.num_layers} layers of {pre.hidden_size}):"
    f" {pre.copy_steps} steps on random copy rows, then {text_steps} on {corpus.num_pretrain:,}"
    f" rows of documentation text ({corpus.num_copies:,} of them copy rows)"
  )
  losses, t0 = [], time.perf_counter()
  with metrics_lib.progress(pre.steps, 0, enabled=True) as bar:
    for batches, steps in phases:
      for _, batch in zip(range(steps), data_lib.iterate(batches.dataset, 0, 0), strict=False):
        variables, opt_state, loss = step(variables, opt_state, batch)
        losses.append(loss)
        bar.update(1)
  with open(corpus.eval) as f:  # held-out sentences: does the base copy them, after another?
    held_out = [json.loads(line)["output"] for line in f][:65]
  first, copied = copy_losses(
    model,
    variables,
    [encode(s) for s in held_out[1:]],
    separator,
    before=[encode(s + " ") for s in held_out[:-1]],
  )
  tail = float(np.mean([float(x) for x in losses[-20:]]))
  print(
    f"pre-trained the base in {time.perf_counter() - t0:.0f} s: train loss {float(losses[0]):.3f}"
    f" -> {tail:.3f} (mean of the last 20 steps); on held-out sentences written twice after "
    "another, "
    f"{first:.3f} nats per token on the first half, {copied:.3f} on the copy; written to {path}"
  )
  decoder_lib.save_hf_decoder(
    path, model, variables, tokenizer_from=corpus.tokenizer, overwrite=True
  )
