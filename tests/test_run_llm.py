"""train/run_llm.py: the tiny offline run end to end, resume, config errors, accumulation, QLoRA."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import checkpoint as checkpoint_lib
import decoder_model
import jax
import jax.numpy as jnp
import llm_data
import llm_offline
import numpy as np
import optax
import pytest
import run_llm
import text_corpus
from errors import ConfigError
from helpers import randomize
from test_run import _assert_user_error as assert_user_error

import lorax_fn as lora_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = jax.random.key
TINY = os.path.join(ROOT, "configs", "llm_offline.py") + ":tiny"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _config(workdir):
  config = run_llm.load_config_file(TINY)
  config.workdir = str(workdir)
  return config


# Every run compiles the same programs: the later ones read them from a shared disk cache.
_ENV = dict(
  os.environ,
  HF_HUB_OFFLINE="1",
  JAX_PLATFORMS="cpu",
  PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "train"), ROOT]),
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)


def _run(workdir, cache, *, killed_after=None):
  """The tiny offline run as the CLI runs it (killed before step ``killed_after + 1``)."""
  script = [os.path.join(ROOT, "train", "run_llm.py")]
  if killed_after is not None:  # run_killed.py's SIGKILL hook, on run_llm's step
    script = [os.path.join(ROOT, "tests", "run_killed.py"), str(killed_after), "run_llm"]
  proc = subprocess.run(
    [sys.executable, *script, "--config", TINY, f"--config.workdir={workdir}"],
    capture_output=True,
    text=True,
    env=dict(_ENV, JAX_COMPILATION_CACHE_DIR=str(cache)),
    timeout=600,
  )
  if killed_after is None and proc.returncode != 0:
    raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _final_arrays(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  last = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  meta, arrays = checkpoint_lib.read_step(checkpoint_lib.epath.Path(ckpts) / str(last))
  return last, meta, arrays


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A whole run; and one killed after step 5 (its last checkpoint: 3), then resumed."""
  root = tmp_path_factory.mktemp("llm")
  full = _run(root / "full", root / "cache")
  os.makedirs(root / "killed")
  for cached in ("corpus", "base_hf"):  # the base pre-trained by the whole run is reused
    shutil.copytree(root / "full" / cached, root / "killed" / cached)
  killed = _run(root / "killed", root / "cache", killed_after=5)
  resumed = _run(root / "killed", root / "cache")
  return root, full, killed, resumed


def test_tiny_offline_run_trains_evaluates_and_exports(runs):
  root, full, _, _ = runs
  workdir = root / "full"
  records = _records(workdir)
  losses = [r["loss"] for r in records if r["split"] == "train" and "loss" in r]
  assert len(losses) == 14
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert "trainable params:" in full.stdout and "pre-trained the base" in full.stdout
  assert "5 steps on random copy rows, then 15 on" in full.stdout
  assert re.search(r"nats per token on the first half, \d+\.\d+ on the copy", full.stdout)
  assert re.search(r"CER on 8 held-out examples: copy_input 0\.\d+, base_prompted", full.stdout)
  results = _results(workdir)
  scores = results["eval"]
  assert {"loss", "perplexity", "cer", "exact_match"} <= set(scores)
  assert np.isclose(scores["perplexity"], np.exp(scores["loss"]))
  assert set(results["baselines"]) == {"copy_input", "base_prompted"}
  assert 0 < results["baselines"]["copy_input"]["cer"] < 0.3  # a few injected errors
  assert [r["step"] for r in records if r["split"] == "eval"] == [4, 8, 12, 14]
  with open(workdir / "generations.jsonl") as f:
    generations = [json.loads(line) for line in f]
  with open(workdir / "corpus" / "eval.jsonl") as f:
    pairs = [json.loads(line) for line in f]
  assert [g["line"] for g in generations] == list(range(1, 9))
  assert [(g["input"], g["reference"]) for g in generations] == [
    (p["input"], p["output"]) for p in pairs[:8]
  ]
  cers = [text_corpus.cer([g["prediction"]], [g["reference"]]) for g in generations]
  assert [g["cer"] for g in generations] == cers
  total = sum(c * len(g["reference"]) for c, g in zip(cers, generations, strict=True))
  assert np.isclose(total / sum(len(g["reference"]) for g in generations), scores["cer"])
  assert f"  generated  {generations[0]['prediction']}" in full.stdout
  assert os.listdir(workdir / "tb") and os.path.getsize(workdir / "curves.png") > 1000
  assert _final_arrays(workdir)[0] == 14
  with open(workdir / "peft" / "adapter_config.json") as f:
    adapter = json.load(f)
  assert (adapter["r"], adapter["lora_alpha"], adapter["task_type"]) == (4, 8.0, "CAUSAL_LM")
  assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == set(ATTENTION)
  assert adapter["base_model_name_or_path"] == str(workdir / "base_hf")
  assert os.path.isfile(workdir / "peft" / "adapter_model.safetensors")


def test_killed_run_resumes_from_its_checkpoint_bit_identical(runs):
  root, _, killed, resumed = runs
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert "resumed from the checkpoint at step 3" in resumed.stdout  # mid accumulation group
  steps = [r["step"] for r in _records(root / "killed") if r["split"] == "train" and "loss" in r]
  assert steps == [1, 2, 3, 4, 5, *range(4, 15)]  # 4 and 5 again after the crash
  step, meta, arrays = _final_arrays(root / "killed")
  want_step, want_meta, want = _final_arrays(root / "full")
  assert step == want_step and arrays.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(arrays[path], want[path], err_msg="/".join(path))
  assert meta["baselines"] == want_meta["baselines"]  # measured once, kept in the checkpoint
  assert _results(root / "killed") == _results(root / "full")


class _CopyOracle:
  """Predicts, with certainty, the token ``offset`` places back of the next one; else uniform."""

  @staticmethod
  def apply(offsets, ids):
    source = jnp.arange(ids.shape[1]) + 1 - offsets[:, None]
    copied = jnp.take_along_axis(ids, jnp.maximum(source, 0), axis=1)
    return 40.0 * jax.nn.one_hot(copied, 8) * (source >= 0)[..., None]


def test_copy_losses_score_the_first_half_and_the_copy_apart():
  sentences, separator = [[4, 5, 6], [3, 7, 5, 6, 2]], [1, 1]
  offsets = jnp.array([len(s) + len(separator) for s in sentences])
  first, copied = llm_offline.copy_losses(_CopyOracle, offsets, sentences, separator)
  np.testing.assert_allclose(first, np.log(8), rtol=1e-6)  # nothing to copy yet: uniform
  assert copied < 1e-6  # padding (token 0, never predicted) would count ~40 nats
  before = [[2, 3], [4]]  # tokens ahead of each row, in neither half: the halves move along
  first, copied = llm_offline.copy_losses(_CopyOracle, offsets, sentences, separator, before=before)
  np.testing.assert_allclose(first, np.log(8), rtol=1e-6)
  assert copied < 1e-6


@pytest.mark.parametrize(
  ("name", "change", "match"),
  [
    ("unknown key", lambda c: c.lora.__setitem__("rnak", 4), r"config\.lora\.rnak is no key"),
    ("bad value", lambda c: c.optim.__setitem__("accumulate_steps", 0), r"accumulate_steps must"),
    ("bad size", lambda c: c.model.pretrain.__setitem__("num_kv_heads", 3), r"must divide"),
    (
      "copy steps",
      lambda c: c.model.pretrain.__setitem__("copy_steps", 20),
      r"copy_steps \(20\) must be under steps \(20\)",
    ),
    ("copy share", lambda c: c.model.pretrain.__setitem__("copy_share", 1.5), r"copy_share must"),
    ("pretrain on a hub model", lambda c: c.model.__setitem__("source", "org/x"), r"only read"),
  ],
)
def test_config_mistakes_are_found_before_any_work(tmp_path, name, change, match):
  del name
  config = _config(tmp_path / "never")
  config.unlock()
  change(config)
  with pytest.raises(ConfigError, match=match):
    run_llm.train_and_evaluate(config)
  assert not os.path.exists(tmp_path / "never")


def _write_pairs(path, n):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"instruction": "Fix.", "input": f"teh {i}", "output": f"the {i}"}) + "\n")


def test_cli_errors_are_one_paragraph_and_exit_status_2(tmp_path):
  _write_pairs(tmp_path / "pairs.jsonl", 3)
  data = [f"--config.data.{k}_path={tmp_path / 'pairs.jsonl'}" for k in ("train", "eval")]
  script = os.path.join(ROOT, "train", "run_llm.py")
  cases = [  # (arguments, what the message says)
    (["--config", TINY, "--config.lora.rnak=4"], r"unknown config key 'lora\.rnak'"),
    (["--config", TINY, "--config.lora.rank=0"], r"config\.lora\.rank must be an integer >= 1"),
    (
      ["--config", os.path.join(ROOT, "configs", "qwen2_grammar.py"), *data],
      r"cannot fetch 'Qwen/Qwen2-1\.5B-Instruct'.*configs/llm_offline\.py",
    ),
  ]
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, script, *args, f"--config.workdir={tmp_path / 'w'}"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for args, _ in cases
  ]
  for proc, (_, match) in zip(procs, cases, strict=True):
    out, err = proc.communicate(timeout=300)
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_user_error(completed, match)  # exit status 2, one paragraph, no traceback


def _tiny_decoder(**kwargs):
  config = decoder_model.DecoderConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attention_bias=True,
    tie_word_embeddings=True,
    model_type="qwen2",
    **kwargs,
  )
  model = decoder_model.Decoder(config)
  return model, model.init(K(0), jnp.zeros((1, 4), jnp.int32))


def _examples(lengths, prompt=3):
  rng = np.random.default_rng(0)
  out = []
  for line, n in enumerate(lengths, start=1):
    mask = (np.arange(n) >= prompt).astype(np.int32)
    out.append(llm_data.Example(rng.integers(1, 97, n).astype(np.int32), mask, prompt, "", line))
  return out


def test_gradient_accumulation_equals_one_big_batch():
  model, base = _tiny_decoder()
  params = lora_fn.wrap(base, rank=3, alpha=6.0, targets=ATTENTION, key=K(1))
  params = randomize(params, K(2), scale=0.3)  # B != 0: every factor gets a gradient
  trainable, frozen = lora_fn.split(params)
  sgd = lora_fn.optimizer(optax.sgd(0.5), params)  # Adam's first step hides a scale error
  # Two micro-batches with different numbers of response tokens (3 + 9 vs 12 + 11).
  micro = llm_data.batches(
    _examples([6, 12, 15, 14, 10]), batch_size=2, max_len=16, seed=0, train=False, packing=False
  )
  assert len(micro) >= 2
  pairs = list(zip(range(2), run_llm.micro_batches(micro, 0, 2, 0), strict=False))
  weights = [w for _, (_, w) in pairs]
  assert weights[0] != 1.0 and np.isclose(sum(weights), 2.0)
  copy = lambda: jax.tree.map(jnp.copy, trainable)  # the step donates its state
  accumulated = {"trainable": copy(), "opt_state": optax.MultiSteps(sgd, 2).init(trainable)}
  step = run_llm.make_train_step(model, optax.MultiSteps(sgd, 2), K(3))
  for i, (_, (batch, weight)) in enumerate(pairs, start=1):
    accumulated, _ = step(accumulated, frozen, batch, i, jnp.float32(weight))
  # One batch of both micro-batches' rows, padded to the same length.
  width = max(b["input_ids"].shape[1] for _, (b, _) in pairs)
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))
  big = {k: np.concatenate([pad(b[k]) for _, (b, _) in pairs]) for k in llm_data.FIELDS}
  one = {"trainable": copy(), "opt_state": sgd.init(trainable)}
  one, _ = run_llm.make_train_step(model, sgd, K(3))(one, frozen, big, 1, jnp.float32(1.0))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one["trainable"], trainable)
  assert max(jax.tree.leaves(moved)) > 1e-3
  for a, b in zip(
    jax.tree.leaves(accumulated["trainable"]), jax.tree.leaves(one["trainable"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_qlora_matches_dense_lora_to_the_quantisation_error():
  model, base = _tiny_decoder()
  quant = lora_fn.quantize(base, "nf4", targets=("kernel",), block_size=64)
  dequant = lora_fn.merge(quant, dtype=jnp.float32)  # the NF4 base, decoded

  def adapted(b):  # the same adapters (same key, same random values) on each base
    return randomize(lora_fn.wrap(b, rank=4, targets=ATTENTION, key=K(1)), K(2), scale=0.2)

  batch = llm_data.batches(
    _examples([9, 12, 7]), batch_size=3, max_len=12, seed=0, train=False, packing=False
  )[0]
  apply = lora_fn.lora(model.apply)
  loss = jax.jit(
    jax.value_and_grad(lambda t, f: run_llm.token_loss(apply, lora_fn.combine(t, f), batch))
  )
  (l_q, g_q), (l_deq, g_deq), (l_dense, _) = (
    loss(*lora_fn.split(adapted(b))) for b in (quant, dequant, base)
  )
  # QLoRA computes exactly LoRA on the decoded base: loss and adapter gradients.
  np.testing.assert_allclose(l_q, l_deq, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_deq), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # And differs from LoRA on the float base by what NF4 rounding costs, no more.
  weights = [
    (np.asarray(w), np.asarray(d))
    for w, d in zip(jax.tree.leaves(base), jax.tree.leaves(dequant), strict=True)
    if np.ndim(w) == 2 and w.shape[0] == 64
  ]
  rel = max(np.abs(w - d).max() / np.abs(w).max() for w, d in weights)
  assert 0 < rel < 0.15  # NF4: 16 levels per block
  assert 0 < abs(float(l_q) - float(l_dense)) < 0.02 * float(l_dense)
