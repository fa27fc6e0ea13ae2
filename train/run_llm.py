"""QLoRA fine-tuning of a decoder (Llama family, Qwen2): one readable script, top to bottom.

    python train/run_llm.py --config configs/llm_offline.py          # offline default, minutes
    python train/run_llm.py --config configs/llm_offline.py:tiny     # seconds (tests, CI)
    python train/run_llm.py --config configs/qwen2_grammar.py \\
        --config.data.train_path=grammar/train.jsonl --config.data.eval_path=grammar/eval.jsonl

From a notebook, with ``train/`` on ``sys.path``::

    import run_llm
    config = run_llm.load_config_file("configs/llm_offline.py:tiny")
    result = run_llm.train_and_evaluate(config)  # workdir, step, eval, generation, peft, ...

The base checkpoint is loaded tensor by tensor with its linear kernels quantised to NF4 (double
quantisation) on the fly (``decoder.load_hf_decoder``), or pre-trained here first for the
offline default (``llm_offline.py``). LoRA adapters go on ``lora.targets``; only they (and
``lora.trainable``) are trained, through ``lorax_fn.lora(model.apply)``: the base is never
merged, dequantised whole or differentiated. ``optax.MultiSteps`` accumulates the gradients of
``optim.accumulate_steps`` micro-batches (a "step" below is one micro-batch), each weighted by
its share of the group's response tokens, so the update equals that of one big batch. The
loss covers response tokens only (``llm_data``'s mask).

Checkpoints, resume, logs, plots and the progress bar are the ViT job's (``run.py``,
``checkpoint.py``, ``metrics.py``): adapters and optimizer state keyed by tree path and
checksummed every ``checkpoint_every_steps``, automatic resume from the newest intact one,
``workdir/metrics.jsonl``, TensorBoard in ``workdir/tb``, ``workdir/curves.png``. Evaluation:
held-out loss and perplexity every ``eval.every_steps`` and at the end; at the end, greedy
generations (``decoder_model.generate`` with the adapters unmerged) scored by exact match and
character error rate, with ``eval.baselines`` against the base model prompted alone and against
copying the input unchanged. ``export_peft`` writes the adapter as a PEFT directory
(``workdir/peft``). A mistake in the config ends the CLI with one paragraph on stderr and exit
status 2 (``--debug`` or ``LORAX_FN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import checkpoint as checkpoint_lib
import data as data_lib
import decoder as decoder_lib
import decoder_model
import jax
import jax.numpy as jnp
import llm_data
import llm_eval
import llm_offline
import llm_validation
import metrics as metrics_lib
import numpy as np
import optax
import run
import validation
from absl import app, flags, logging
from errors import ConfigError, HubUnreachable
from evaluation import xent

import lorax_fn as lora_fn

load_config_file = run.load_config_file  # ``get_config(arg)`` of ``path[:arg]``


def load_base(config: Any, source: str, mesh: Any) -> tuple[decoder_model.Decoder, dict]:
  """The frozen base, its linear kernels quantised as ``model.quantize`` says."""
  try:
    return decoder_lib.load_hf_decoder(
      source,
      quantize=config.model.quantize or None,
      double_quant=config.model.double_quant,
      dtype=jnp.dtype(config.model.compute_dtype),
      scan_layers=config.model.scan_layers,
      remat=config.model.remat,
      mesh=mesh,
      rules=config.sharding,
    )
  except HubUnreachable as e:
    raise ConfigError(f"config.model.source: {e} {llm_validation.HINT}") from e


def wrap_base(config: Any, base: dict) -> Any:
  """The base's variables with fresh LoRA adapters (B = 0) on ``lora.targets``."""
  return lora_fn.wrap(
    base,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    targets=tuple(config.lora.targets),
    dropout=config.lora.dropout,
    rslora=config.lora.rslora,
    layouts={f"params/{k}": v for k, v in decoder_model.layouts(base["params"]).items()},
    key=jax.random.key(config.seed + 1),
  )


def token_loss(apply: Callable[..., Any], params: Any, batch: Any, **kwargs: Any) -> jax.Array:
  """Mean cross-entropy over the batch's response tokens (``loss_mask``), packed rows apart."""
  logits = apply(
    params,
    batch["input_ids"],
    positions=batch["positions"],
    segment_ids=batch["segment_ids"],
    **kwargs,
  )
  return xent(logits, batch["targets"], batch["loss_mask"])


def make_train_step(
  model: decoder_model.Decoder, tx: optax.GradientTransformation, key: jax.Array
) -> Callable[..., tuple[dict[str, Any], jax.Array]]:
  """The jitted step ``(state, frozen, batch, step, weight) -> (state, loss)``; state donated.

  ``weight`` scales the micro-batch's loss for the gradient (its share of the accumulation
  group's tokens, see :func:`micro_batches`); the loss returned is the plain token mean. The
  dropout key of a step is ``fold_in(key, step)``: the step number is the whole RNG state.
  """
  apply = lora_fn.lora(model.apply)

  def train_step(state, frozen, batch, step, weight):
    def loss_fn(trainable):
      params = lora_fn.combine(trainable, frozen)
      loss = token_loss(apply, params, batch, dropout_key=jax.random.fold_in(key, step))
      return loss * weight, loss

    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    return {"trainable": trainable, "opt_state": opt_state}, loss

  return jax.jit(train_step, donate_argnums=0)


def micro_batches(
  batches: llm_data.Batches, start: int, k: int, workers: int
) -> Iterator[tuple[dict[str, np.ndarray], float]]:
  """``(batch, weight)`` for steps ``start + 1, ...``, read a group of ``k`` at a time.

  ``optax.MultiSteps`` averages the ``k`` gradients of a group; weighting each micro-batch's
  mean loss by ``k · n_i / Σ n`` (``n``: response tokens) makes that average the gradient of
  the group's token mean, as one batch of all ``k`` would give, even when the micro-batches
  hold different numbers of tokens. A resumed run re-reads its group from the start.
  """
  skip = start % k
  it = data_lib.iterate(batches.dataset, start - skip, workers)
  while True:
    group = [next(it) for _ in range(k)]
    counts = [int(b["loss_mask"].sum()) for b in group]
    total = max(sum(counts), 1)
    for batch, n in list(zip(group, counts, strict=True))[skip:]:
      yield batch, k * n / total
    skip = 0


def offline_or_given(config: Any, workdir: str) -> tuple[str, str, str]:
  """``(checkpoint, train JSONL, eval JSONL)``: the config's, or the offline task's."""
  if config.model.source != llm_offline.SOURCE:
    return config.model.source, config.data.train_path, config.data.eval_path
  offline = llm_offline.prepare(config, workdir)
  return (
    offline.base,
    config.data.train_path or offline.train,
    config.data.eval_path or offline.eval,
  )


def export_peft(config: Any, params: Any, source: str) -> str:
  """Writes the adapters as a PEFT directory, ``workdir/peft``, naming ``source`` as the base.

  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), path)``
  loads it.
  """
  path = os.path.abspath(os.path.join(config.workdir, "peft"))
  inner = jax.device_get(params["params"])
  lora_fn.save_peft(
    path,
    inner,
    modules=decoder_model.peft_modules(inner),
    trainable=tuple(config.lora.trainable) or None,
    layouts=decoder_model.layouts(inner),
    base_model_name_or_path=os.path.abspath(source) if os.path.isdir(source) else source,
    task_type="CAUSAL_LM",
    overwrite=True,
  )
  print(f"PEFT adapter on {source} written to {path}")
  return path


def train_and_evaluate(config: Any) -> dict[str, Any]:
  """Runs a whole QLoRA job: set-up, resume, train, evaluate, export.

  Args:
    config: a run config (``configs/qwen2_grammar.py`` / ``llm_offline.py``'s ``get_config()``).

  Returns:
    ``workdir``; ``step`` and ``interrupted``; ``eval`` (held-out loss, perplexity, and at the
    end exact match and CER of greedy generations); ``baselines`` (CER of copying the input
    and of the base prompted alone, with ``eval.baselines``); ``train_loss`` (``(step,
    loss)`` pairs); ``curves``; ``peft`` (the PEFT directory, with ``export_peft``);
    ``generations`` (``workdir/generations.jsonl``: each scored example's input, greedy
    generation, reference and CER); ``seconds`` (wall time of the whole call).

  Raises:
    ConfigError: a mistake in the config, or a library ``ValueError`` while setting up.
    FloatingPointError: the loss stopped being finite.
  """
  t_start = time.perf_counter()
  # --------------------------------------------------------------------------------- Config
  llm_validation.validate_config(config)
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  k = config.optim.accumulate_steps
  with validation.user_errors():
    if jax.process_count() > 1:
      raise ConfigError("train/run_llm.py runs in one process (any number of its devices)")
    mesh = lora_fn.make_mesh(config.mesh)
    data_sharding = lora_fn.batch_sharding(mesh)

    # ------------------------------------------------------------------------- Base, data
    source, train_path, eval_path = offline_or_given(config, workdir)
    model, base = load_base(config, source, mesh)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoder_lib.resolve_checkpoint(source))
    fmt, max_len = config.data.format, config.data.max_len
    read = lambda path: llm_data.load_examples(path, tokenizer, format=fmt, max_len=max_len)
    train_examples, eval_examples = read(train_path), read(eval_path)
    plan = dict(batch_size=config.batch_size, max_len=max_len, seed=config.seed)
    plan["packing"] = config.data.packing
    train_batches = llm_data.batches(train_examples, train=True, epochs=config.epochs, **plan)
    eval_batches = llm_data.batches(eval_examples, train=False, **plan)
    total_steps = len(train_batches) // k * k  # whole accumulation groups only
    if total_steps == 0:
      raise ConfigError(
        f"config.optim.accumulate_steps {k} is more than the {len(train_batches)} batches of "
        f"{config.batch_size} rows that {config.epochs} epochs of {train_path!r} make"
      )
    print(
      f"{len(train_examples)} training examples: {total_steps} steps of {config.batch_size} "
      f"rows x {max_len} tokens ({train_batches.padding_fraction:.1%} padding), an update "
      f"every {k}; {len(eval_examples)} held out"
    )

    # ------------------------------------------------------------------------------ Model
    params = wrap_base(config, base)
    trainable_spec = tuple(config.lora.trainable) or None  # None: adapters only
    print(lora_fn.summary(params, trainable=trainable_spec))
    params = lora_fn.shard(params, mesh, config.sharding)

    # -------------------------------------------------------------------- Optimizer, step
    schedule, inner = run.make_optimizer(config, params, trainable_spec, total_steps // k)
    tx = optax.MultiSteps(inner, every_k_schedule=k)
    state, frozen = run.init_state(tx, params, trainable_spec)
    train_step = make_train_step(model, tx, jax.random.key(config.seed + 2))
    apply = lora_fn.lora(model.apply)  # one function: generation and eval compile once
    eval_loss = jax.jit(lambda p, b: token_loss(apply, p, b))
    put = lambda batch: jax.device_put(batch, data_sharding)

    # ---------------------------------------------------------------------- Checkpoints
    meta = {
      "adapter": lora_fn.adapter_config(params, trainable=trainable_spec),
      "base_model": config.model.source,
      "config": config.to_dict(),
    }

    def check_meta(saved: dict[str, Any]) -> None:
      if not isinstance(saved.get("adapter"), dict):
        raise checkpoint_lib.DamagedCheckpoint("its meta lacks the adapter config")
      where = f"checkpoint directory {ckpts.directory!r}"
      lora_fn.check_adapter_config(saved["adapter"], meta["adapter"], where)
      if saved.get("base_model") != config.model.source:
        raise ConfigError(
          f"{where} was trained on {saved.get('base_model')!r}, not {config.model.source!r}; "
          "use another --config.workdir"
        )

    ckpts = checkpoint_lib.Checkpoints(
      os.path.abspath(os.path.join(workdir, "checkpoints")), keep=config.keep_checkpoints
    )
    start, baselines = 0, {}
    restored = ckpts.restore_latest(state, check_meta=check_meta)
    if restored is not None:
      start, state, saved = restored
      baselines = saved.get("baselines", {})
      if start > total_steps:
        raise ConfigError(
          f"the checkpoint in {ckpts.directory!r} is at step {start}, past this run's "
          f"{total_steps} steps; use another --config.workdir or more epochs"
        )
      print(f"resumed from the checkpoint at step {start}")

  # ------------------------------------------------------------------ Generation, baselines
  limit = config.eval.generate_limit or len(eval_examples)
  gen_examples = eval_examples.examples[:limit]
  references = [e.response for e in gen_examples]
  longest = max(len(e.input_ids) - e.prompt_len for e in gen_examples)
  max_new = config.eval.max_new_tokens or longest + 8

  def generation_scores(params: Any) -> tuple[dict[str, float], list[str]]:
    texts = llm_eval.generate_responses(
      model,
      apply,
      params,
      gen_examples,
      tokenizer,
      max_new_tokens=max_new,
      batch_size=config.eval.batch_size,
    )
    return llm_eval.scores(texts, references), texts

  if config.eval.baselines and not baselines:
    copies = llm_eval.copy_inputs(eval_path, gen_examples)
    if copies is not None:
      baselines["copy_input"] = llm_eval.scores(copies, references)
    # B = 0: the wrapped model computes exactly what the base computes.
    baselines["base_prompted"] = generation_scores(lora_fn.combine(state["trainable"], frozen))[0]
    for name, s in baselines.items():
      print(f"baseline {name}: CER {s['cer']:.4f}, exact match {s['exact_match']:.3f}")

  def save(step: int) -> None:
    progress = {
      "step": step,
      "baselines": baselines,
      "data_position": {"batch": step, "accumulate_steps": k},
      "rng": {"seed": config.seed + 2, "per_step": "fold_in(key, step)"},
    }
    ckpts.save(step, state, meta | progress)

  # ----------------------------------------------------------------------------------- Train
  log = metrics_lib.Writer(workdir)
  bar = metrics_lib.progress(total_steps, start, enabled=True)
  batches = micro_batches(train_batches, start, k, config.data.workers)
  lr = lambda s: schedule(s // k)  # micro-step -> the learning rate of its update
  pending: list[tuple[int, jax.Array]] = []
  history: list[tuple[int, float]] = []
  tokens, t0 = 0, time.perf_counter()
  step, interrupted, scores, texts = start, False, {}, []
  with run.StopSignals() as signals, contextlib.closing(ckpts), contextlib.closing(bar):
    for step in range(start + 1, total_steps + 1):
      batch, weight = next(batches)
      tokens += int(batch["loss_mask"].sum())
      state, loss = train_step(state, frozen, put(batch), step, jnp.float32(weight))
      pending.append((step, loss))
      bar.update(1)
      is_log = step % config.log_every_steps == 0 or step == total_steps
      interrupted = signals.agreed(can_agree=True)
      # Mid-group is fine: MultiSteps' state holds the gradients summed so far.
      is_save = step % config.checkpoint_every_steps == 0 or step == total_steps or interrupted
      every = config.eval.every_steps
      is_eval = step == total_steps or (every and step % every == 0)
      if is_log or is_save:
        history += run.log_losses(pending, log, lr, ckpts.latest_step(), workdir)
      if is_log:
        rate = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history[-1][1]:.4f}", tok_s=f"{rate:.0f}")
        log.scalars(step, "train", {"response_tokens_per_s": rate})
      if is_eval and not interrupted:
        params = lora_fn.combine(state["trainable"], frozen)
        scores = llm_eval.heldout_loss(eval_loss, params, eval_batches, put)
        if step == total_steps:
          generated, texts = generation_scores(params)
          scores |= generated
        log.scalars(step, "eval", scores)
        shown = ", ".join(f"{k_}: {v:.4f}" for k_, v in scores.items() if k_ != "tokens")
        bar.write(f"step {step}: eval {shown}")
      if is_save and ckpts.latest_step() != step:
        save(step)
      if interrupted:
        bar.write(f"interrupted at step {step}: saved a checkpoint, stopping")
        break
  params = lora_fn.combine(state["trainable"], frozen)
  result = {
    "workdir": workdir,
    "step": step,
    "interrupted": interrupted,
    "eval": scores,
    "baselines": baselines,
    "train_loss": history,
    "curves": None,
    "peft": None,
    "generations": None,
    "params": params,
    "seconds": None,
  }
  if interrupted:
    log.close()
    return result

  # --------------------------------------------------------------------------------- Results
  result["curves"] = os.path.join(workdir, "curves.png")
  log.plot(result["curves"], eval_keys=("loss",), eval_ylim=None)
  log.close()
  if config.export_peft:
    result["peft"] = export_peft(config, params, source)
  if "cer" in scores:
    figures = {**{k_: s["cer"] for k_, s in baselines.items()}, "tuned": scores["cer"]}
    print(
      f"CER on {len(gen_examples)} held-out examples: "
      + ", ".join(f"{name} {cer:.4f}" for name, cer in figures.items())
    )
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"eval": scores, "baselines": baselines, "step": step}, f, indent=2)
    result["generations"] = llm_eval.write_generations(
      os.path.join(workdir, "generations.jsonl"), eval_path, gen_examples, texts
    )
    for record in llm_eval.samples(result["generations"], 3):
      print(record)
  result["seconds"] = time.perf_counter() - t_start
  return result


def main(argv: list[str]) -> None:
  """The CLI: a mistake in the config is one paragraph on stderr and exit status 2."""
  del argv
  config = flags.FLAGS.config
  debug = flags.FLAGS.debug or os.environ.get("LORAX_FN_DEBUG", "") not in ("", "0")
  if config is None:
    run._exit_user_error("--config is required, e.g. --config configs/llm_offline.py")
  try:
    result = train_and_evaluate(config)
  except (ConfigError, FloatingPointError) as e:
    if debug:
      raise
    if isinstance(e, FloatingPointError):
      raise SystemExit(f"error: {e}") from None  # status 1
    run._exit_user_error(str(e))
  if result["interrupted"]:
    raise SystemExit(130)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=run.parse_flags)
