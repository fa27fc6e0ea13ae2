"""Real English offline: sentences from Python's documentation, a tokenizer, a spelling task.

Every CPython ships its language reference as ``pydoc_data.topics`` (what ``help("assert")``
shows) and documents its standard library in docstrings: hundreds of kilobytes of edited prose,
on every machine, with no download. ``build_offline_corpus`` cleans them into sentences, keeps
some back, trains a small byte-level BPE tokenizer on the rest (saved as a directory that
``transformers.AutoTokenizer.from_pretrained`` loads, with EOS, PAD and a chat template, so the
job takes the same path as for a real checkpoint) and turns the held-out sentences into a
spelling-correction task with injected errors. ``cer`` scores it.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence

import numpy as np

INSTRUCTION = "Correct the spelling."
EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD, "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (  # ChatML, as Qwen2's
  "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
  "{{ message['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COPY_SEPARATOR = "\n"  # between a sentence and its copy in a pre-training copy row
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"[A-Z][A-Za-z ,;'()-]*[a-z]\.")  # letters and light punctuation only
_DOCSTRING = re.compile(r'"""(.*?)"""', re.S)


def documentation_texts() -> list[str]:
  """The pydoc topics and the docstrings of the standard library's top-level modules, in order."""
  from pydoc_data.topics import topics

  texts = [topics[k] for k in sorted(topics)]
  for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      texts += [inspect.cleandoc(m.group(1)) for m in _DOCSTRING.finditer(f.read())]
  return texts


def sentences(text: str, *, min_words: int = 5, max_words: int = 30) -> list[str]:
  """The prose sentences of ``text``: indented blocks (code, grammar) and symbols left out.

  Example:
    >>> text = "Lists are mutable.  Use x[0] to index.\\n\\n   a = [1]\\n\\nA tuple is not mutable."
    >>> sentences(text, min_words=3)
    ['Lists are mutable.', 'A tuple is not mutable.']
  """
  out = []
  for paragraph in re.split(r"\n\s*\n", text):
    lines = paragraph.strip("\n").split("\n")
    if any(line.startswith((" ", "\t")) for line in lines):
      continue
    for sentence in _SPLIT.split(" ".join(line.strip() for line in lines)):
      sentence = sentence.replace('"', "")  # pydoc quotes names: "assert" statement
      if _PROSE.fullmatch(sentence) and min_words <= len(sentence.split()) <= max_words:
        out.append(sentence)
  return out


def corpus_sentences() -> list[str]:
  """Every distinct sentence of ``documentation_texts()``, in first-seen order."""
  return list(dict.fromkeys(s for text in documentation_texts() for s in sentences(text)))


def corrupt(sentence: str, *, rate: float, rng: np.random.Generator) -> str:
  """``sentence`` with spelling errors injected at ``rate`` per letter; never ``sentence`` itself.

  Each letter, with probability ``rate``, is swapped with the next letter, deleted, doubled or
  replaced by another letter (of the same case); ``rng`` decides, so the result is reproducible.

  Raises:
    ValueError: ``rate`` not in (0, 1], or a sentence without letters.

  Example:
    >>> corrupt("Spelling matters.", rate=0.1, rng=np.random.default_rng(0))
    'Spleling matetrt.'
  """
  if not 0 < rate <= 1:
    raise ValueError(f"rate must be in (0, 1]; got: {rate}")
  if not any(c.isalpha() for c in sentence):
    raise ValueError(f"a sentence with letters is needed; got: {sentence!r}")
  while True:
    out, i = [], 0
    while i < len(sentence):
      c = sentence[i]
      kind = rng.integers(4) if c.isalpha() and rng.random() < rate else None
      if kind == 0 and i + 1 < len(sentence) and sentence[i + 1].isalpha():
        out += [sentence[i + 1], c]  # swap
        i += 1
      elif kind == 2:
        out += [c, c]
      elif kind == 3:
        letter = "abcdefghijklmnopqrstuvwxyz".replace(c.lower(), "")[rng.integers(25)]
        out.append(letter.upper() if c.isupper() else letter)
      elif kind != 1:  # 1 deletes
        out.append(c)
      i += 1
    if "".join(out) != sentence:
      return "".join(out)


def levenshtein(a: str, b: str) -> int:
  """The fewest insertions, deletions and substitutions that turn ``a`` into ``b``.

  Example:
    >>> levenshtein("kitten", "sitting")
    3
  """
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    current = [i]
    for j, cb in enumerate(b, start=1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Character error rate: total edit distance over total reference length.

  Raises:
    ValueError: different numbers of predictions and references, or empty references.

  Example:
    >>> cer(["kitten", "abc"], ["sitting", "abc"])  # 3 edits over 10 characters
    0.3
  """
  if len(predictions) != len(references):
    raise ValueError(
      f"predictions and references must pair up; got: {len(predictions)} and {len(references)}"
    )
  total = sum(len(r) for r in references)
  if not total:
    raise ValueError("references must have characters; got: none")
  return sum(levenshtein(p, r) for p, r in zip(predictions, references, strict=True)) / total


def build_tokenizer(texts: Iterable[str], directory: str, *, vocab_size: int) -> None:
  """Trains a byte-level BPE on ``texts`` and saves it where ``AutoTokenizer`` loads it.

  The tokenizer has EOS ``<|endoftext|>``, PAD ``<|pad|>`` and a ChatML chat template; it adds no
  BOS. ``vocab_size`` counts the 256 bytes and 4 special tokens, so 260 is character level.

  Raises:
    ValueError: ``vocab_size`` under 260.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}; got: {vocab_size}")
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  bpe.train_from_iterator(texts, trainer)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
  tokenizer.chat_template = CHAT_TEMPLATE
  tokenizer.save_pretrained(directory)


@dataclasses.dataclass(frozen=True)
class OfflineCorpus:
  """The files ``build_offline_corpus`` wrote.

  Attributes:
    pretrain: JSONL of ``{"text": sentence}``, the sentences not held out (then any copy rows).
    train: JSONL correction pairs (``instruction``, ``input``: corrupted, ``output``: original).
    eval: JSONL correction pairs of other held-out sentences.
    tokenizer: a tokenizer directory for ``AutoTokenizer.from_pretrained``.
    num_pretrain: how many pre-training rows.
    num_copies: how many of them are copy rows (the last ones).
  """

  pretrain: str
  train: str
  eval: str
  tokenizer: str
  num_pretrain: int
  num_copies: int = 0


def build_offline_corpus(
  workdir: str,
  *,
  seed: int,
  n_train: int,
  n_eval: int,
  rate: float = 0.05,
  vocab_size: int = 512,
  max_chars: int = 100,
  copies: float = 0.0,
) -> OfflineCorpus:
  """Pre-training text, a tokenizer and a spelling-correction task, from Python's documentation.

  The sentences are shuffled with ``seed``; the first ``n_train + n_eval`` of at most
  ``max_chars`` characters are held out of pre-training (and of the tokenizer) and corrupted at
  ``rate`` per letter into correction pairs. The same arguments write the same files.

  Args:
    workdir: where the files go (created if missing).
    seed: the split and corruption seed.
    n_train: correction pairs to fine-tune on.
    n_eval: correction pairs to evaluate on.
    rate: the per-letter probability of a spelling error.
    vocab_size: the tokenizer's vocabulary, 260 (bytes) or more.
    max_chars: the longest held-out sentence.
    copies: the share of pre-training sentences also written as a copy row: the sentence
      among one or two others (in random order, each followed by a space or a newline), then a
      newline (``COPY_SEPARATOR``) and the sentence again. Language modelling that rewards
      looking back and copying, a generic skill a prompted task builds on. Where the copied
      sentence sits varies, so only copying by content works, not copying from a fixed place
      (the row's start, the last sentence, the text after a newline). These rows follow the
      plain ones; none holds a held-out sentence.

  Returns:
    The paths written.

  Raises:
    ValueError: not enough sentences for ``n_train + n_eval`` and some pre-training text;
      ``copies`` not in [0, 1].
  """
  if not 0 <= copies <= 1:
    raise ValueError(f"copies must be in [0, 1]; got: {copies}")
  everything = corpus_sentences()
  order = np.random.default_rng([seed, 0]).permutation(len(everything))
  short = [i for i in order if len(everything[i]) <= max_chars][: n_train + n_eval]
  held_out = set(short)
  pretrain = [everything[i] for i in order if i not in held_out]
  if len(short) < n_train + n_eval or len(pretrain) < len(everything) // 2:
    raise ValueError(
      f"n_train + n_eval must leave half of the {len(everything)} sentences for pre-training "
      f"and find enough of at most {max_chars} characters; got: {n_train} + {n_eval}"
    )
  os.makedirs(workdir, exist_ok=True)
  paths = {k: os.path.join(workdir, f"{k}.jsonl") for k in ("pretrain", "train", "eval")}
  repeat = np.random.default_rng([seed, 2]).permutation(len(pretrain))[
    : round(copies * len(pretrain))
  ]
  rng = np.random.default_rng([seed, 3])
  rows = pretrain + [_copy_row(pretrain, i, rng) for i in sorted(repeat)]
  _write_jsonl(paths["pretrain"], [{"text": s} for s in rows])
  rng = np.random.default_rng([seed, 1])
  pairs = [
    {"instruction": INSTRUCTION, "input": corrupt(s, rate=rate, rng=rng), "output": s}
    for s in (everything[i] for i in short)
  ]
  _write_jsonl(paths["train"], pairs[:n_train])
  _write_jsonl(paths["eval"], pairs[n_train:])
  tokenizer = os.path.join(workdir, "tokenizer")
  build_tokenizer(pretrain, tokenizer, vocab_size=vocab_size)
  return OfflineCorpus(
    **paths, tokenizer=tokenizer, num_pretrain=len(rows), num_copies=len(rows) - len(pretrain)
  )


def _copy_row(sentences: Sequence[str], i: int, rng: np.random.Generator) -> str:
  """The copy row of sentence ``i``: the sentence and one or two others in random order.

  A space or a newline follows each but the last, then ``COPY_SEPARATOR`` and sentence ``i``
  again.
  """
  others = [sentences[j] for j in rng.choice(len(sentences), size=int(rng.integers(1, 3)))]
  pieces = others[:]
  pieces.insert(int(rng.integers(len(pieces) + 1)), sentences[i])
  context = "".join(p + rng.choice([" ", "\n"]) for p in pieces[:-1]) + pieces[-1]
  return context + COPY_SEPARATOR + sentences[i]


def _write_jsonl(path: str, records: Sequence[dict[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
