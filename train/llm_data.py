"""Data for decoder fine-tuning: JSONL records to tokens, response-only loss, packed batches.

Records are JSON lines in one of three formats:

* ``"instruction"``: ``{"instruction", "input" (optional), "output"}`` in the seed's
  ``### INSTRUCTION:`` / ``### INPUT:`` / ``### RESPONSE:`` layout; loss on the output and EOS.
* ``"chat"``: ``{"messages": [{"role", "content"}, ...]}`` through the tokenizer's chat template;
  loss on the assistant turns, each as the template ends it (e.g. ``answer<|im_end|>\\n``).
* ``"text"``: ``{"text"}``, plain text for pre-training; loss on every token and EOS.

A prompt and its response are tokenised separately and concatenated, so training sees the prompt
exactly as generation will. A line that is not JSON or lacks a field is skipped and counted with
its line number. A sequence longer than ``max_len`` keeps its first ``max_len`` tokens (the
prompt's head and as much of the response as fits) and is counted; one whose response would
start past ``max_len`` has nothing to learn from and is dropped (counted too). Each file gets one
summary line in the log; none of this raises.

Batches are planned up front in numpy (shuffle, then pack or bucket) and served by a grain
``MapDataset`` indexed by step, as in ``train/data.py``: batch ``i`` is the same whatever happened
before, so a resumed run reads exactly the batches an uninterrupted run would, and
``data.iterate`` prefetches them with threads or processes. grain's own packers
(``grain.experimental.FirstFitPackIterDataset``) are iterator datasets: no random access by step,
so resuming would need their saved iterator state; the plan here needs only the seed.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

FORMATS = ("instruction", "chat", "text")
FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def render_instruction(record: Mapping[str, Any]) -> tuple[str, str]:
  """The seed's prompt and response for an instruction record (the response without EOS).

  Example:
    >>> record = {"instruction": "Add.", "input": "1 2", "output": "3"}
    >>> prompt, response = render_instruction(record)
    >>> print(prompt + response)
    ### INSTRUCTION:
    Add.
    <BLANKLINE>
    ### INPUT:
    1 2
    <BLANKLINE>
    ### RESPONSE:
    3
    >>> render_instruction({"instruction": "Greet.", "output": "Hi"})[0]
    '### INSTRUCTION:\\nGreet.\\n\\n### RESPONSE:\\n'
  """
  prompt = f"### INSTRUCTION:\n{record['instruction']}\n\n"
  if record.get("input"):
    prompt += f"### INPUT:\n{record['input']}\n\n"
  return prompt + "### RESPONSE:\n", record["output"]


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenised record.

  Attributes:
    input_ids: int32 ``(n,)``, ``n <= max_len``.
    loss_mask: int32 ``(n,)``, 1 on response tokens (incl. EOS / the end of an assistant turn).
    prompt_len: tokens before the last response: what generation continues from.
    response: the last response's text (without EOS), the reference for exact match.
    line: the record's 1-based line number in its file.
  """

  input_ids: np.ndarray
  loss_mask: np.ndarray
  prompt_len: int
  response: str
  line: int


@dataclasses.dataclass
class Examples:
  """The usable examples of a file, and what was skipped, truncated or dropped (line numbers)."""

  examples: list[Example]
  path: str
  bad_lines: list[tuple[int, str]]  # (line, why)
  truncated: list[int]
  dropped: list[int]

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> Example:
    return self.examples[i]

  def summary(self) -> str:
    """One line: counts, and the first few line numbers of each kind of problem."""
    parts = [f"{self.path}: {len(self.examples)} examples"]
    if self.bad_lines:
      shown = "; ".join(f"line {n}: {why}" for n, why in self.bad_lines[:5])
      parts.append(f"{len(self.bad_lines)} bad lines skipped ({shown})")
    for name, lines in (("truncated", self.truncated), ("dropped", self.dropped)):
      if lines:
        parts.append(f"{len(lines)} longer than max_len {name} (lines {lines[:10]})")
    return ", ".join(parts)


def load_examples(path: str, tokenizer: Any, *, format: str, max_len: int) -> Examples:
  """Reads and tokenises a JSONL file; logs a summary of the lines it could not use.

  Args:
    path: a JSONL file, one record per line (blank lines are ignored).
    tokenizer: a transformers tokenizer (``AutoTokenizer.from_pretrained(checkpoint_dir)``).
    format: ``"instruction"``, ``"chat"`` or ``"text"``.
    max_len: the most tokens an example keeps.

  Returns:
    The examples in file order, with the skipped, truncated and dropped line numbers.

  Raises:
    ValueError: an unknown ``format``; a tokenizer without EOS, or without a chat template for
      ``"chat"``; a chat template that does not render a conversation's turns as prefixes of the
      whole; a file with no usable example.
  """
  check_tokenizer(tokenizer, format=format)
  records, bad = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        bad.append((n, f"not JSON ({e.msg})"))
        continue
      problem = _check_record(record, format)
      if problem:
        bad.append((n, problem))
      else:
        records.append((n, record))
  result = encode(records, tokenizer, format=format, max_len=max_len)
  result.path, result.bad_lines = path, bad
  (logging.warning if bad or result.truncated or result.dropped else logging.info)(
    "%s", result.summary()
  )
  if not result.examples:
    raise ValueError(f"{path} has no usable example; {result.summary()}")
  return result


def check_tokenizer(tokenizer: Any, *, format: str) -> None:
  """Raises a ValueError if ``tokenizer`` cannot encode ``format``."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}; got: {format!r}")
  if tokenizer.eos_token_id is None:
    raise ValueError(f"the tokenizer {tokenizer.name_or_path!r} has no EOS token")
  if format == "chat" and not getattr(tokenizer, "chat_template", None):
    raise ValueError(
      f"format 'chat' needs a tokenizer with a chat template; {tokenizer.name_or_path!r} has "
      "none (use format 'instruction', or a checkpoint whose tokenizer_config.json or "
      "chat_template.jinja defines one)"
    )


def _check_record(record: Any, format: str) -> str | None:
  """Why ``record`` cannot be used, or None."""
  if not isinstance(record, dict):
    return f"a JSON object is needed; got: {type(record).__name__}"
  required = {"instruction": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}
  for key in required[format]:
    if key not in record:
      return f"no {key!r} field"
  for key in ("instruction", "output", "text"):
    if key in required[format] and not isinstance(record[key], str):
      return f"{key!r} must be a string; got: {type(record[key]).__name__}"
  if format == "instruction" and not isinstance(record.get("input") or "", str):
    return f"'input' must be a string; got: {type(record['input']).__name__}"
  if format == "chat":
    messages = record["messages"]
    ok = lambda m: (
      isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
    )
    if not isinstance(messages, list) or not all(ok(m) for m in messages):
      return "'messages' must be a list of {'role': str, 'content': str}"
    if not any(m["role"] == "assistant" for m in messages):
      return "no assistant message"
  return None


def encode(
  records: Sequence[tuple[int, Mapping[str, Any]]], tokenizer: Any, *, format: str, max_len: int
) -> Examples:
  """Tokenises checked ``(line, record)`` pairs; see ``load_examples``."""
  check_tokenizer(tokenizer, format=format)
  pieces: list[list[tuple[str, bool]]] = []  # per record: (text, is response), in order
  responses = []
  for _, record in records:
    if format == "instruction":
      prompt, response = render_instruction(record)
      pieces.append([(prompt, False), (response, True)])
    elif format == "text":
      pieces.append([("", False), (record["text"], True)])
      response = record["text"]
    else:
      pieces.append(_chat_pieces(tokenizer, record["messages"]))
      response = [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    responses.append(response)
  # One batched call per kind: the first piece may take the tokenizer's BOS (a chat template
  # writes its own), the others never.
  firsts = [p[0][0] for p in pieces]
  firsts = tokenizer(firsts, add_special_tokens=format != "chat")["input_ids"] if firsts else []
  rest = [text for p in pieces for text, _ in p[1:]]
  rest_ids = iter(tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
  out = Examples([], "", [], [], [])
  for (line, _), p, first, response in zip(records, pieces, firsts, responses, strict=True):
    ids, mask, prompt_len = list(first), [0] * len(first), 0
    for _, is_response in p[1:]:
      more = next(rest_ids)
      if is_response:
        prompt_len = len(ids)
      ids += more
      mask += [int(is_response)] * len(more)
    if format != "chat":  # a chat template ends its turns itself
      ids.append(tokenizer.eos_token_id)
      mask.append(1)
    if len(ids) > max_len:
      ids, mask = ids[:max_len], mask[:max_len]
      if not any(mask[1:]):  # no response token left to predict
        out.dropped.append(line)
        continue
      out.truncated.append(line)
    as_array = lambda x: np.asarray(x, np.int32)
    out.examples.append(Example(as_array(ids), as_array(mask), prompt_len, response, line))
  return out


def _chat_pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
  """The rendered conversation cut into prompt and assistant pieces, by rendering prefixes."""
  render = lambda m, gen=False: tokenizer.apply_chat_template(
    m, tokenize=False, add_generation_prompt=gen
  )
  full = render(messages)
  pieces, done = [], 0
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before, through = render(messages[:i], True), render(messages[: i + 1])
    if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
      raise ValueError(
        f"the chat template of {tokenizer.name_or_path!r} does not render the conversation up "
        f"to message {i} as a prefix of the whole conversation, so its assistant turns cannot "
        "be located for the loss mask"
      )
    pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
    done = len(through)
  return [*pieces, (full[done:], False)]


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batches:
  """This process's batches, indexed by step, and what the plan costs in padding.

  Each batch is a dict of int32 ``(batch_size, seq_len)`` arrays: ``input_ids``; ``targets``,
  the next token of the same segment (0 at a segment's last token); ``loss_mask``, 1 where the
  target is a response token; ``segment_ids``, 1..k for the sequences packed in a row and 0 on
  padding; ``positions``, restarting at 0 in each segment. Padding has input id 0.

  Attributes:
    dataset: a grain ``MapDataset`` of the batches (``data.iterate(dataset, start, workers)``).
    epoch: ``(len,)`` the epoch that each step's first row comes from.
    padding_fraction: padded token slots over all slots, over every process's batches.
  """

  dataset: grain.MapDataset
  epoch: np.ndarray
  padding_fraction: float

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    return self.dataset[step]


def batches(
  examples: Sequence[Example],
  *,
  batch_size: int,
  max_len: int,
  seed: int,
  train: bool,
  epochs: int = 1,
  packing: bool = True,
  buckets: Sequence[int] | None = None,
) -> Batches:
  """Fixed-size batches, indexed by step, of this process's rows of each global batch.

  Training shuffles with ``seed``, anew each epoch; evaluation does not. With
  ``packing``, examples are packed best-fit decreasing (longest first, equal lengths in shuffled
  order) into rows of ``max_len`` tokens, and training shuffles the rows into batches: packed
  sequences never attend to each other, so what a row holds does not change the gradient, only
  which batch does. Without ``packing``, each row holds one example padded to the smallest of
  ``buckets`` that fits (default: about 1.25x apart, multiples of 8), each batch one bucket, so
  a jitted step compiles once per bucket. The last batch is filled with empty rows (segment 0).

  Args:
    examples: tokenised examples, each at most ``max_len`` tokens.
    batch_size: rows per batch on this process (a global batch has ``jax.process_count()`` times
      as many).
    max_len: the row length when packing; the longest bucket otherwise.
    seed: the shuffle seed.
    train: shuffle (each epoch anew), or not.
    epochs: passes over the examples.
    packing: pack several examples per row, or bucket them one per row.
    buckets: row lengths to bucket into (``packing=False``); ``max_len`` is always added.

  Returns:
    The batches, the epoch of each, and the padding fraction.

  Raises:
    ValueError: a non-positive ``batch_size`` or ``epochs``, an example longer than ``max_len``,
      or ``buckets`` that are not positive integers up to ``max_len``.
  """
  for name, value in (("batch_size", batch_size), ("epochs", epochs), ("max_len", max_len)):
    if value < 1:
      raise ValueError(f"{name} must be positive; got: {value}")
  lengths = np.array([len(e.input_ids) for e in examples], np.int64)
  if len(lengths) and lengths.max() > max_len:
    i = int(lengths.argmax())
    raise ValueError(
      f"max_len must hold every example; got: {max_len}, and the example of line "
      f"{examples[i].line} has {lengths[i]} tokens"
    )
  rows_per_batch = batch_size * jax.process_count()
  plan, epoch = [], []
  for e in range(epochs):
    rng = np.random.default_rng([seed, e])
    order = rng.permutation(len(lengths)) if train else np.arange(len(lengths))
    if packing:  # longest first; rows stay apart in attention, so only batches need mixing
      rows = _best_fit(lengths, order[np.argsort(-lengths[order], kind="stable")], max_len)
      rows = [rows[k] for k in rng.permutation(len(rows))] if train else rows
      plan += [(max_len, row) for row in rows]
    else:
      epoch_plan = _bucket(lengths, order, _buckets(buckets, max_len), rows_per_batch)
      epoch_plan = (
        [epoch_plan[k] for k in rng.permutation(len(epoch_plan))] if train else epoch_plan
      )
      plan += epoch_plan
    epoch += [e] * (len(plan) - len(epoch))
  if packing:  # rows -> batches of rows; the last one filled with empty rows
    starts = range(0, len(plan), rows_per_batch)
    epoch = [epoch[s] for s in starts]
    plan = [(max_len, [row for _, row in plan[s : s + rows_per_batch]]) for s in starts]
  plan = [(n, rows + [()] * (rows_per_batch - len(rows))) for n, rows in plan]
  slots = sum(n * len(rows) for n, rows in plan)
  padding = 1 - lengths.sum() * epochs / slots if slots else 0.0
  mine = slice(jax.process_index() * batch_size, (jax.process_index() + 1) * batch_size)
  plan = [(n, tuple(tuple(int(i) for i in row) for row in rows[mine])) for n, rows in plan]
  dataset = grain.MapDataset.source(plan).map(_Assemble(examples))
  return Batches(dataset, np.asarray(epoch, np.int32), float(padding))


def _best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
  """Packs ``order`` into rows of ``capacity``: each example into the fullest row it fits."""
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (room left, row), sorted
  smallest = int(lengths.min()) if len(lengths) else 1
  for i in order:
    k = bisect.bisect_left(free, (lengths[i], -1))
    if k == len(free):
      rows.append([])
      room, row = capacity, len(rows) - 1
    else:
      room, row = free.pop(k)
    rows[row].append(int(i))
    if room - lengths[i] >= smallest:  # rows nothing fits into any more leave the search
      bisect.insort(free, (room - int(lengths[i]), row))
  return rows


def _buckets(buckets: Sequence[int] | None, max_len: int) -> np.ndarray:
  if buckets is None:
    buckets, n = [], 16
    while n < max_len:
      buckets.append(n)
      n = -(-int(n * 1.25) // 8) * 8
  if any(not isinstance(b, int | np.integer) or not 0 < b <= max_len for b in buckets):
    raise ValueError(f"buckets must be integers in [1, max_len={max_len}]; got: {list(buckets)}")
  return np.unique([*buckets, max_len])


def _bucket(
  lengths: np.ndarray, order: np.ndarray, bounds: np.ndarray, rows_per_batch: int
) -> list[tuple[int, list[tuple[int]]]]:
  """One epoch's batches of single-example rows, each batch from one bucket."""
  which = np.searchsorted(bounds, lengths[order])  # the smallest bound >= the length
  plan = []
  for b in np.unique(which):
    ids = order[which == b]
    for s in range(0, len(ids), rows_per_batch):
      plan.append((int(bounds[b]), [(int(i),) for i in ids[s : s + rows_per_batch]]))
  return plan


class _Assemble:
  """A planned batch ``(seq_len, rows of example indices)`` to its arrays."""

  def __init__(self, examples: Sequence[Example]):
    self.examples = examples

  def __call__(self, entry: tuple[int, tuple[tuple[int, ...], ...]]) -> dict[str, np.ndarray]:
    seq_len, rows = entry
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in FIELDS}
    for r, row in enumerate(rows):
      t = 0
      for segment, i in enumerate(row, start=1):
        ids, mask = self.examples[i].input_ids, self.examples[i].loss_mask
        n = len(ids)
        out["input_ids"][r, t : t + n] = ids
        out["targets"][r, t : t + n - 1] = ids[1:]
        out["loss_mask"][r, t : t + n - 1] = mask[1:]
        out["segment_ids"][r, t : t + n] = segment
        out["positions"][r, t : t + n] = np.arange(n)
        t += n
    return out
