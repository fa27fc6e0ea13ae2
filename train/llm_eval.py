"""Evaluation for ``train/run_llm.py``: held-out loss and perplexity, and greedy generations.

Generations are scored against the held-out responses by exact match (after stripping
surrounding whitespace) and character error rate (``text_corpus.cer``). For a correction task
the "copy the input" baseline comes from the same records: a model that changes nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import data as data_lib
import decoder_model
import jax
import llm_data
import numpy as np
import text_corpus


def heldout_loss(
  loss: Callable[[Any, dict[str, jax.Array]], jax.Array],
  params: Any,
  batches: llm_data.Batches,
  put: Callable[[dict[str, np.ndarray]], Any],
) -> dict[str, float]:
  """The mean cross-entropy per response token over every batch, and its perplexity.

  Args:
    loss: ``(params, batch) -> mean token cross-entropy`` of the batch (jitted).
    params: the variables to evaluate.
    batches: the held-out batches (not shuffled).
    put: places a host batch on the devices.
  """
  total, count = 0.0, 0
  for batch in data_lib.iterate(batches.dataset, 0, 0):
    n = int(batch["loss_mask"].sum())
    total += float(loss(params, put(batch))) * n
    count += n
  mean = total / max(count, 1)
  return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def generate_responses(
  model: decoder_model.Decoder,
  apply: Callable[..., Any],
  params: Any,
  examples: Sequence[llm_data.Example],
  tokenizer: Any,
  *,
  max_new_tokens: int,
  batch_size: int,
) -> list[str]:
  """Greedy continuations of each example's prompt, decoded without special tokens.

  Every batch has the same shape (prompts left-padded to the longest, the last batch filled
  with copies of the first prompt), so generation compiles once.
  """
  prompts = [e.input_ids[: e.prompt_len] for e in examples]
  width = -(-max(len(p) for p in prompts) // 8) * 8
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  stops = sorted({tokenizer.eos_token_id, *_end_of_turn(tokenizer)})
  texts = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    chunk += [prompts[0]] * (batch_size - len(chunk))
    ids = np.full((batch_size, width), pad, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for row, p in enumerate(chunk):
      ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    out, lengths = decoder_model.generate(
      model,
      params,
      ids,
      prompt_mask=mask,
      max_new_tokens=max_new_tokens,
      stop_tokens=stops,
      pad_id=pad,
      apply_fn=apply,
      return_lengths=True,
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    for row in range(min(batch_size, len(prompts) - start)):
      tokens = [t for t in out[row, : lengths[row]] if t not in stops]
      texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
  return texts


def _end_of_turn(tokenizer: Any) -> list[int]:
  """The id of ``<|im_end|>`` (ChatML's end of a turn) where the tokenizer has it."""
  token = tokenizer.convert_tokens_to_ids("<|im_end|>")
  return [] if token is None or token == tokenizer.unk_token_id else [int(token)]


def scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Exact match and character error rate of generations against the references."""
  references = [r.strip() for r in references]
  exact = np.mean([p == r for p, r in zip(predictions, references, strict=True)])
  return {"exact_match": float(exact), "cer": text_corpus.cer(predictions, references)}


def copy_inputs(path: str, examples: Sequence[llm_data.Example]) -> list[str] | None:
  """The ``input`` of each example's record (the "change nothing" answer), if all have one."""
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  inputs = []
  for e in examples:
    value = json.loads(lines[e.line - 1]).get("input")
    if not isinstance(value, str) or not value:
      return None
    inputs.append(value.strip())
  return inputs


def write_generations(
  path: str, records_path: str, examples: Sequence[llm_data.Example], predictions: Sequence[str]
) -> str:
  """Writes one JSON line per scored example: its line, input, prediction, reference and CER.

  ``input`` is the record's ``input`` field (instruction records) or, for other formats,
  ``None``. Written atomically (a temporary file, then a rename); returns ``path``.
  """
  with open(records_path, encoding="utf-8") as f:
    lines = f.readlines()
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for e, prediction in zip(examples, predictions, strict=True):
      source = json.loads(lines[e.line - 1])
      reference = e.response.strip()
      record = {
        "line": e.line,
        "input": source.get("input") if isinstance(source, dict) else None,
        "prediction": prediction,
        "reference": reference,
        "cer": text_corpus.cer([prediction], [reference]) if reference else None,
      }
      f.write(json.dumps(record) + "\n")
  os.replace(tmp, path)
  return path


def samples(path: str, count: int) -> list[str]:
  """The first ``count`` records of a generations file, each as a few readable lines."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f.readlines()[:count]:
      r = json.loads(line)
      shown = [f"line {r['line']} (CER {r['cer']:.3f}):" if r["cer"] is not None else "line:"]
      if r["input"] is not None:
        shown.append(f"  input      {r['input']}")
      shown += [f"  generated  {r['prediction']}", f"  reference  {r['reference']}"]
      out.append("\n".join(shown))
  return out
