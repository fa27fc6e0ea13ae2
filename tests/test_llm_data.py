"""``train/llm_data.py`` and ``train/text_corpus.py``: tokens, loss masks, packing, the corpus."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import llm_data
import numpy as np
import pytest
import text_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = text_corpus.CHAT_TEMPLATE
QWEN2_LIKE = (  # a default system turn when there is none, as Qwen2's template does
  "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
  "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
  "{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_LIKE = (  # BOS written by the template, headers, content trimmed
  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
  "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NOT_PREFIX = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}"
SPECIALS = [
  "<|endoftext|>",
  "<|pad|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|begin_of_text|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
]
TEXT = "The quick brown fox jumps over the lazy dog. Spelling errors are corrected here. " * 20
CONVERSATION = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "What is two and two?"},
  {"role": "assistant", "content": "Four."},
  {"role": "user", "content": "And three and three?"},
  {"role": "assistant", "content": "Six, of course."},
]


def make_tokenizer(directory, *, chat_template=None, bos=None, eos="<|endoftext|>"):
  """A tiny byte-level BPE saved and loaded back as a checkpoint's tokenizer would be."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=SPECIALS,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  bpe.train_from_iterator([TEXT], trainer)
  if bos:
    bpe.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=bpe, eos_token=eos, pad_token="<|pad|>", bos_token=bos
  )
  if chat_template:
    tokenizer.chat_template = chat_template
  tokenizer.save_pretrained(str(directory))
  return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return make_tokenizer(tmp_path_factory.mktemp("tok"), chat_template=CHATML)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
  return make_tokenizer(
    tmp_path_factory.mktemp("bos"), chat_template=LLAMA3_LIKE, bos="<|begin_of_text|>"
  )


def write_jsonl(path, lines):
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


def runs(mask):
  """(start, stop) of each run of ones."""
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


# ------------------------------------------------------------------------------------------
# Rendering and loss masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "record, prompt",
  [
    (
      {"instruction": "Fix it.", "input": "teh cat", "output": "the cat"},
      "### INSTRUCTION:\nFix it.\n\n### INPUT:\nteh cat\n\n### RESPONSE:\n",
    ),
    ({"instruction": "Greet.", "output": "Hi"}, "### INSTRUCTION:\nGreet.\n\n### RESPONSE:\n"),
    (
      {"instruction": "Greet.", "input": "", "output": "Hi"},
      "### INSTRUCTION:\nGreet.\n\n### RESPONSE:\n",
    ),
  ],
)
def test_render_instruction(record, prompt):
  assert llm_data.render_instruction(record) == (prompt, record["output"])


@pytest.mark.parametrize("bos", [False, True])
def test_instruction_loss_mask_is_the_response_and_eos(tmp_path, tokenizer, bos_tokenizer, bos):
  tok = bos_tokenizer if bos else tokenizer
  records = [
    {"instruction": "Correct the spelling.", "input": "Teh fox jmups.", "output": "The fox jumps."},
    {"instruction": "Say something.", "output": "The lazy dog."},
  ]
  data = llm_data.load_examples(
    write_jsonl(tmp_path / "d.jsonl", records), tok, format="instruction", max_len=128
  )
  assert [e.line for e in data] == [1, 2] and not data.bad_lines
  for example, record in zip(data, records, strict=True):
    ids, mask = example.input_ids, example.loss_mask
    prompt, response = llm_data.render_instruction(record)
    assert tok.decode(ids[mask == 1]) == response + "<|endoftext|>"
    assert tok.decode(ids[: example.prompt_len]) == ("<|begin_of_text|>" if bos else "") + prompt
    assert runs(mask) == [(example.prompt_len, len(ids))] and example.response == response
    assert ids.dtype == mask.dtype == np.int32


@pytest.mark.parametrize(
  "template, turns",
  [
    (CHATML, ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]),
    (QWEN2_LIKE, ["Four.<|im_end|>\n", "Six, of course.<|im_end|>\n"]),
    (LLAMA3_LIKE, ["Four.<|eot_id|>", "Six, of course.<|eot_id|>"]),
  ],
)
def test_chat_loss_mask_is_the_assistant_turns(tmp_path, template, turns):
  tok = make_tokenizer(tmp_path / "tok", chat_template=template, bos="<|begin_of_text|>")
  path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
  (example,) = llm_data.load_examples(path, tok, format="chat", max_len=256)
  ids, mask = example.input_ids, example.loss_mask
  assert [tok.decode(ids[a:b]) for a, b in runs(mask)] == turns
  # The whole sequence is the template's rendering, with the template's BOS only.
  assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
  prompt = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
  assert tok.decode(ids[: example.prompt_len]) == prompt
  assert example.response == "Six, of course."
  # In a batch the mask weights targets: the same tokens, one position earlier.
  batch = llm_data.batches([example], batch_size=1, max_len=256, seed=0, train=False)[0]
  targets = batch["targets"][0][batch["loss_mask"][0] == 1]
  assert tok.decode(targets) == "".join(turns)


def test_text_examples_learn_every_token(tmp_path, bos_tokenizer):
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The lazy dog."}])
  (example,) = llm_data.load_examples(path, bos_tokenizer, format="text", max_len=64)
  assert bos_tokenizer.decode(example.input_ids) == "<|begin_of_text|>The lazy dog.<|endoftext|>"
  assert example.prompt_len == 1 and example.loss_mask[1:].all()


def test_bad_lines_are_counted_with_their_line_numbers(tmp_path, tokenizer, caplog):
  good = {"instruction": "Say it.", "output": "The dog."}
  lines = [
    good,
    "{not json",
    {"instruction": "Say it."},
    "",
    {"instruction": 3, "output": "x"},
    [1, 2],
    {"instruction": "Say it.", "input": ["a"], "output": "x"},
    good,
  ]
  texts = [{"text": 5}, {"txt": "a"}, {"text": "The dog."}]
  data = llm_data.load_examples(
    write_jsonl(tmp_path / "text.jsonl", texts), tokenizer, format="text", max_len=64
  )
  assert [e.line for e in data] == [3]
  assert data.bad_lines == [(1, "'text' must be a string; got: int"), (2, "no 'text' field")]
  path = write_jsonl(tmp_path / "bad.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    data = llm_data.load_examples(path, tokenizer, format="instruction", max_len=64)
  assert [e.line for e in data] == [1, 8]
  assert data.bad_lines == [
    (2, "not JSON (Expecting property name enclosed in double quotes)"),
    (3, "no 'output' field"),
    (5, "'instruction' must be a string; got: int"),
    (6, "a JSON object is needed; got: list"),
    (7, "'input' must be a string; got: list"),
  ]
  assert "5 bad lines skipped (line 2: not JSON" in caplog.text
  chats = [
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user"}]},
    {"messages": CONVERSATION},
  ]
  data = llm_data.load_examples(
    write_jsonl(tmp_path / "chat.jsonl", chats), tokenizer, format="chat", max_len=256
  )
  assert [e.line for e in data] == [3]
  assert data.bad_lines == [
    (1, "no assistant message"),
    (2, "'messages' must be a list of {'role': str, 'content': str}"),
  ]


def test_long_sequences_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
  records = [
    {"instruction": "Say it.", "output": "The dog."},
    {"instruction": "Say it.", "output": "The quick brown fox jumps over the lazy dog. " * 4},
    {"instruction": "Say it. " * 30, "output": "The dog."},
  ]
  path = write_jsonl(tmp_path / "long.jsonl", records)
  max_len = len(tokenizer(llm_data.render_instruction(records[0])[0])["input_ids"]) + 12
  data = llm_data.load_examples(path, tokenizer, format="instruction", max_len=max_len)
  assert data.truncated == [2] and data.dropped == [3] and [e.line for e in data] == [1, 2]
  long = data[1]
  assert len(long.input_ids) == max_len and long.loss_mask[long.prompt_len :].all()
  assert long.input_ids[-1] != tokenizer.eos_token_id  # the response was cut
  assert "1 longer than max_len truncated (lines [2])" in data.summary()


@pytest.mark.parametrize(
  "format, tokenizer_kind, match",
  [
    ("chat", "plain", "format 'chat' needs a tokenizer with a chat template; .* has none"),
    ("json", "chat", r"format must be one of \('instruction', 'chat', 'text'\); got: 'json'"),
    ("chat", "not_prefix", "does not render the conversation up to message 2 as a prefix"),
    ("instruction", "empty_file", "has no usable example"),
    ("instruction", "no_eos", "the tokenizer .* has no EOS token"),
  ],
)
def test_errors(tmp_path, tokenizer, format, tokenizer_kind, match):
  tok = {
    "plain": lambda: make_tokenizer(tmp_path / "plain"),
    "not_prefix": lambda: make_tokenizer(tmp_path / "np", chat_template=NOT_PREFIX),
    "no_eos": lambda: make_tokenizer(tmp_path / "no_eos", eos=None),
  }.get(tokenizer_kind, lambda: tokenizer)()
  lines = ["{}"] if tokenizer_kind == "empty_file" else [{"messages": CONVERSATION}]
  path = write_jsonl(tmp_path / "x.jsonl", lines)
  with pytest.raises(ValueError, match=match):
    llm_data.load_examples(path, tok, format=format, max_len=256)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def synthetic(lengths, response_from=0.5):
  """Examples whose tokens are all distinct (so each can be traced), responses in the back half."""
  out, start = [], 1
  for n in lengths:
    mask = (np.arange(n) >= int(n * response_from)).astype(np.int32)
    ids = np.arange(start, start + n, dtype=np.int32)
    out.append(llm_data.Example(ids, mask, int(mask.argmax()), "", len(out) + 1))
    start += n
  return out


def realistic_lengths(n, max_len, seed=0):
  """Instruction-tuning-like token lengths: log-normal, median ~max_len/4, a long tail."""
  lengths = np.random.default_rng(seed).lognormal(np.log(max_len / 4), 0.6, n)
  return np.clip(lengths.astype(int), 8, max_len)


def check_rows(batch, examples):
  """Segments hold whole examples, positions restart, targets stay in their segment.

  Returns the lines of the examples met, in order.
  """
  by_first = {int(e.input_ids[0]): e for e in examples}
  seen = []
  for r in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    used = int((seg > 0).sum())
    assert not seg[used:].any() and (np.diff(seg[:used], prepend=1) >= 0).all()
    np.testing.assert_array_equal(np.unique(seg[:used]), np.arange(1, seg.max() + 1))
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      ids = batch["input_ids"][r, where]
      example = by_first[int(ids[0])]
      np.testing.assert_array_equal(ids, example.input_ids)
      np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))
      np.testing.assert_array_equal(batch["targets"][r, where[:-1]], ids[1:])
      np.testing.assert_array_equal(batch["loss_mask"][r, where[:-1]], example.loss_mask[1:])
      assert batch["targets"][r, where[-1]] == 0 and batch["loss_mask"][r, where[-1]] == 0
      seen.append(example.line)
    pad = seg == 0
    assert not (batch["loss_mask"][r, pad].any() or batch["input_ids"][r, pad].any())
    assert not batch["positions"][r, pad].any()
  return seen


@pytest.mark.parametrize("packing", [True, False])
def test_every_example_appears_once_per_epoch(packing):
  max_len, epochs = 256, 2
  examples = synthetic(realistic_lengths(300, max_len))
  ds = llm_data.batches(
    examples, batch_size=4, max_len=max_len, seed=7, train=True, epochs=epochs, packing=packing
  )
  seen_by_epoch = [[] for _ in range(epochs)]
  for step in range(len(ds)):
    batch = ds[step]
    assert batch.keys() == set(llm_data.FIELDS)
    assert all(v.dtype == np.int32 and v.shape == batch["input_ids"].shape for v in batch.values())
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape[1] == max_len or not packing
    seen_by_epoch[ds.epoch[step]] += check_rows(batch, examples)
  everything = sum(seen_by_epoch, [])
  assert sorted(everything) == sorted(list(range(1, 301)) * epochs)
  assert everything[:300] != everything[300:]  # each epoch its own order


def test_padding_stays_under_15_percent_with_packing():
  for max_len, n in ((512, 2000), (2048, 500)):
    ds = llm_data.batches(
      synthetic(realistic_lengths(n, max_len, seed=1)),
      batch_size=8,
      max_len=max_len,
      seed=0,
      train=True,
      epochs=1,
    )
    assert ds.padding_fraction < 0.15, (max_len, ds.padding_fraction)
  buckets = llm_data.batches(
    synthetic(realistic_lengths(2000, 512, seed=1)),
    batch_size=8,
    max_len=512,
    seed=0,
    train=True,
    packing=False,
  )
  assert buckets.padding_fraction < 0.15


def test_padding_fraction_is_what_the_batches_hold():
  examples = synthetic(realistic_lengths(50, 128))
  for packing in (True, False):
    ds = llm_data.batches(examples, batch_size=3, max_len=128, seed=0, train=True, packing=packing)
    slots = sum(ds[i]["segment_ids"].size for i in range(len(ds)))
    padded = sum(int((ds[i]["segment_ids"] == 0).sum()) for i in range(len(ds)))
    assert ds.padding_fraction == pytest.approx(padded / slots)


def test_batches_are_deterministic_and_resumable_by_step():
  examples = synthetic(realistic_lengths(120, 128))
  make = lambda seed: llm_data.batches(
    examples, batch_size=2, max_len=128, seed=seed, train=True, epochs=3
  )
  ds, again, other = make(3), make(3), make(4)
  for step in (len(ds) - 1, 0, 5):  # any order: a resumed run starts anywhere
    for key in llm_data.FIELDS:
      np.testing.assert_array_equal(ds[step][key], again[step][key])
  assert not np.array_equal(ds[0]["input_ids"], other[0]["input_ids"])
  resumed = list(ds.dataset[5:].to_iter_dataset())
  np.testing.assert_array_equal(resumed[0]["input_ids"], ds[5]["input_ids"])
  assert len(resumed) == len(ds) - 5


def test_evaluation_reads_every_example_once_and_fills_the_last_batch():
  examples = synthetic([30, 40, 50, 20, 60])
  ds = llm_data.batches(examples, batch_size=2, max_len=64, seed=0, train=False, packing=False)
  lines = [line for i in range(len(ds)) for line in check_rows(ds[i], examples)]
  assert lines == [4, 1, 2, 3, 5]  # by bucket, then file order
  assert [ds[i]["input_ids"].shape for i in range(len(ds))] == [
    (2, n) for n in (24, 32, 40, 56, 64)
  ]
  packed = llm_data.batches(examples, batch_size=3, max_len=64, seed=0, train=False)
  lines = [line for i in range(len(packed)) for line in check_rows(packed[i], examples)]
  assert lines == [5, 3, 2, 4, 1] and len(packed) == 2  # rows 60, 50, 40 + 20, 30: longest first
  assert not packed[1]["segment_ids"][1:].any() and packed.padding_fraction == 1 - 200 / 384


def test_processes_read_their_rows_of_each_global_batch(monkeypatch):
  examples = synthetic(realistic_lengths(40, 128))
  whole = llm_data.batches(examples, batch_size=4, max_len=128, seed=1, train=True)
  monkeypatch.setattr(llm_data.jax, "process_count", lambda: 2)
  parts = []
  for index in (0, 1):
    monkeypatch.setattr(llm_data.jax, "process_index", lambda index=index: index)
    parts.append(llm_data.batches(examples, batch_size=2, max_len=128, seed=1, train=True))
  assert len(parts[0]) == len(parts[1]) == len(whole)
  assert parts[0].padding_fraction == whole.padding_fraction
  for step in range(len(whole)):
    joined = np.concatenate([p[step]["input_ids"] for p in parts])
    np.testing.assert_array_equal(joined, whole[step]["input_ids"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"max_len": 16}, "max_len must hold every example; got: 16, and the example of line 2 has 20"),
    ({"batch_size": 0}, "batch_size must be positive; got: 0"),
    ({"epochs": 0}, "epochs must be positive; got: 0"),
    ({"packing": False, "buckets": [8, 40]}, r"buckets must be integers in \[1, max_len=32\]"),
  ],
)
def test_batch_errors(kwargs, match):
  args = {"batch_size": 2, "max_len": 32, "seed": 0, "train": True, **kwargs}
  with pytest.raises(ValueError, match=match):
    llm_data.batches(synthetic([10, 20]), **args)


# ------------------------------------------------------------------------------------------
# The offline corpus
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "a, b, distance",
  [
    ("", "", 0),
    ("abc", "", 3),
    ("", "ab", 2),
    ("kitten", "sitting", 3),
    ("flaw", "lawn", 2),
    ("abcd", "abdc", 2),
    ("spelling", "speling", 1),
    ("same", "same", 0),
  ],
)
def test_levenshtein(a, b, distance):
  assert text_corpus.levenshtein(a, b) == distance == text_corpus.levenshtein(b, a)


def test_cer():
  assert text_corpus.cer(["The cat."], ["The cat."]) == 0.0
  assert text_corpus.cer(["Teh cat."], ["The cat."]) == 2 / 8
  assert text_corpus.cer(["", "abcd"], ["ab", "abdc"]) == (2 + 2) / 6  # pooled, not averaged
  with pytest.raises(ValueError, match="must pair up; got: 1 and 2"):
    text_corpus.cer(["a"], ["a", "b"])
  with pytest.raises(ValueError, match="references must have characters"):
    text_corpus.cer([""], [""])


def test_corrupt_is_deterministic_and_always_changes_the_sentence():
  sentence = "The quick brown fox jumps over the lazy dog."
  rng = lambda: np.random.default_rng(5)
  out = [text_corpus.corrupt(sentence, rate=0.05, rng=rng()) for _ in range(2)]
  assert out[0] == out[1] != sentence
  many = np.random.default_rng(0)
  rates = [
    text_corpus.cer([text_corpus.corrupt(sentence, rate=0.1, rng=many)], [sentence])
    for _ in range(200)
  ]
  assert 0.05 < np.mean(rates) < 0.2 and min(rates) > 0
  with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]; got: 0"):
    text_corpus.corrupt(sentence, rate=0, rng=many)
  with pytest.raises(ValueError, match="a sentence with letters is needed"):
    text_corpus.corrupt("1 2 3.", rate=0.5, rng=many)


def test_offline_corpus_is_real_deterministic_and_held_out(tmp_path):
  corpora = [
    text_corpus.build_offline_corpus(str(tmp_path / d), seed=0, n_train=200, n_eval=50)
    for d in "ab"
  ]
  for name in ("pretrain.jsonl", "train.jsonl", "eval.jsonl", "tokenizer/tokenizer.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  corpus = corpora[0]

  def read(path):
    with open(path) as f:
      return [json.loads(line) for line in f]

  pretrain = [r["text"] for r in read(corpus.pretrain)]
  train, evaluation = read(corpus.train), read(corpus.eval)
  assert corpus.num_pretrain == len(pretrain) > 2500 and len(train) == 200 and len(evaluation) == 50
  assert corpus.num_copies == 0
  # Copy rows: a quarter of the sentences again, at the end: the sentence among one or two
  # others (a space or a newline after each), a newline, the sentence again.
  doubled = text_corpus.build_offline_corpus(
    str(tmp_path / "c"), seed=0, n_train=200, n_eval=50, copies=0.25
  )
  rows = [r["text"] for r in read(doubled.pretrain)]
  assert rows[: len(pretrain)] == pretrain and doubled.num_pretrain == len(rows)
  assert doubled.num_copies == len(rows) - len(pretrain) == round(0.25 * len(pretrain))
  sentences, places = set(pretrain), set()
  for row in rows[len(pretrain) :]:
    context, copy = row.rsplit("\n", 1)
    pieces = re.split(r"(?<=\.)[ \n](?=[A-Z])", context)  # sentences end with a period
    assert copy in sentences and copy in pieces and 2 <= len(pieces) <= 3
    assert set(pieces) <= sentences
    places.add((pieces.index(copy), len(pieces)))
  assert places == {(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)}  # the copied sentence: anywhere
  words = " ".join(pretrain).lower().split()
  assert len(set(words)) > 3000 and {"the", "function", "returns", "object"} <= set(words)
  held_out = {r["output"] for r in train + evaluation}
  assert len(held_out) == 250 and not held_out & set(pretrain)
  assert all(
    r["instruction"] == "Correct the spelling." and r["input"] != r["output"]
    for r in train + evaluation
  )
  assert 0.02 < text_corpus.cer([r["input"] for r in train], [r["output"] for r in train]) < 0.15
  # The tokenizer loads as a checkpoint's would, and takes the instruction and chat paths.
  tok = transformers.AutoTokenizer.from_pretrained(corpus.tokenizer)
  assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>") and tok.chat_template
  assert tok.decode(tok(pretrain[0])["input_ids"]) == pretrain[0]
  data = llm_data.load_examples(corpus.train, tok, format="instruction", max_len=384)
  assert len(data) == 200 and not (data.bad_lines or data.truncated or data.dropped)
  ds = llm_data.batches(data.examples, batch_size=8, max_len=384, seed=0, train=True)
  assert ds.padding_fraction < 0.15
