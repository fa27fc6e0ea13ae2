"""LoRA fine-tuning of a ViT: one readable script, top to bottom (big_vision style).

    python train/run.py --config configs/vit_food101.py            # ViT-B/16 on Food-101
    python train/run.py --config configs/digits.py                 # offline default, minutes
    python train/run.py --config configs/vit_food101.py --config.lora.rank=8 --config.epochs=1

From a notebook, with ``train/`` on ``sys.path`` (the progress bar renders in Jupyter)::

    import run
    config = run.load_config_file("configs/digits.py")
    config.epochs = 2
    result = run.train_and_evaluate(config)  # workdir, best_accuracy, step, best_adapter, ...

Only the adapters and the head are trained (``lorax_fn.optimizer``); the frozen base never
gets a gradient and is never written to a checkpoint. Checkpoints (adapters + head +
optimizer state, keyed by tree path and checksummed; see ``checkpoint.py``) are saved every
``checkpoint_every_steps`` and the run resumes from the newest intact one automatically;
batches are indexed by step, so a resumed run reads the same data as an uninterrupted one.
Metrics go to ``workdir/metrics.jsonl`` and TensorBoard (``workdir/tb``); ``workdir/curves.png``
plots them at the end. ``export_peft`` / ``export_hf`` write the best adapter as a PEFT
directory (``workdir/peft``) and the best model merged for transformers
(``workdir/merged_hf``). The whole config is checked before any work: a mistake ends the CLI
with one paragraph on stderr and exit status 2 (``--debug`` or ``LORAX_FN_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import checkpoint as checkpoint_lib
import data as data_lib
import digits_demo
import hf_vit
import jax
import jax.numpy as jnp
import metrics as metrics_lib
import numpy as np
import optax
import orbax.checkpoint as ocp
import validation
import vit as vit_lib
from absl import app, flags, logging
from errors import ConfigError
from etils import epath
from evaluation import evaluate, xent
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import lorax_fn as lora_fn

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a mistake in the config.")


def load_splits(config: Any) -> tuple[data_lib.Split, data_lib.Split]:
  if config.data.name == "digits":
    return data_lib.digits(config.data.classes, image_size=config.data.image_size)
  return (
    data_lib.load_hf(config.data.name, config.data.path, config.data.train_split),
    data_lib.load_hf(config.data.name, config.data.path, config.data.eval_split),
  )


def load_base(config: Any, num_classes: int, workdir: str) -> tuple[Any, Any]:
  """The frozen base model: a Hugging Face ViT, or (offline) one initialised or pre-trained here.

  Its head is a fresh one of ``num_classes`` outputs.
  """
  key = jax.random.key(config.seed)
  dtype = jnp.dtype(config.model.compute_dtype)
  size = config.data.image_size
  if config.model.source in validation.LOCAL_MODELS:
    model = vit_lib.ViT(
      num_classes=num_classes,
      dtype=dtype,
      scan_layers=config.model.scan_layers,
      remat=config.model.remat,
      **config.model.preset,
    )
    if config.model.source == "random":
      return model, model.init(key, jnp.zeros((1, size, size, 3)))
    if jax.process_count() > 1:
      raise ConfigError("model.source 'pretrain:digits' (the offline demo) runs in one process")
    return model, digits_demo.pretrained_base(config, model, num_classes, f"{workdir}/base")
  model, variables = hf_vit.load_hf_vit(
    config.model.source, num_classes=num_classes, key=key, scan_layers=config.model.scan_layers
  )
  grid = variables["params"]["pos_embed"].shape[1] - 1  # patches: fixed by the checkpoint
  if (size // model.patch_size) ** 2 != grid or size % model.patch_size:
    side = math.isqrt(grid) * model.patch_size
    raise ConfigError(
      f"config.data.image_size must be {side} for {config.model.source!r} (its position "
      f"embeddings cover {grid} patches of {model.patch_size} pixels); got: {size}"
    )
  return model.clone(remat=config.model.remat, dtype=dtype), variables


def wrap_base(config: Any, model: Any, base: Any) -> Any:
  """The base's variables with LoRA adapters on ``config.lora.targets`` (fresh A, B = 0).

  Restore a trained adapter onto it with ``lora_fn.restore_adapter(workdir/best_adapter,
  wrap_base(...), trainable=config.lora.trainable)``.
  """
  size = config.data.image_size
  layouts = lora_fn.infer_layouts(model.apply, base, jnp.zeros((1, size, size, 3)))
  return lora_fn.wrap(
    base,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    targets=tuple(config.lora.targets),
    dropout=config.lora.dropout,
    rslora=config.lora.rslora,
    layouts=layouts,
    key=jax.random.key(config.seed + 1),
  )


def on_host(tree: Any) -> Any:
  """Every array of ``tree`` whole on this host; call it on every process (it gathers)."""

  def one(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(one, tree)


def check_peft_export(model: Any, params: Any, trainable: tuple[str, ...]) -> None:
  """Raises before training, not after it, if PEFT could not name a module the run trains."""
  modules = hf_vit.peft_modules(model, prefix="params")
  mask = lora_fn.trainable_mask(params, trainable=trainable)
  is_mark = lambda x: isinstance(x, bool) or lora_fn.is_lora(x)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lora_fn.is_lora)[0]
  unmapped = [
    jax.tree_util.keystr(path, simple=True, separator="/")
    for (path, leaf), mark in zip(flat, jax.tree.leaves(mask, is_leaf=is_mark), strict=True)
    if (lora_fn.is_lora(leaf) or mark)
    and jax.tree_util.keystr(path[:-1], simple=True, separator="/") not in modules
  ]
  if unmapped:
    names = sorted({m.rsplit("/", 1)[-1] for m in modules})
    raise ConfigError(
      f"config.export_peft: the run trains {unmapped[:4]}, which belong to no module of "
      f"ViTForImageClassification, so a PEFT adapter cannot hold them; config.lora.targets "
      f"and lora.trainable may name the modules {names}"
    )


def export_peft(config: Any, model: Any, params: Any, base: Any, class_names: list[str]) -> str:
  """Writes ``params``' adapters and head as a PEFT directory, ``workdir/peft``.

  ``peft.PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(base), path)``
  loads it. An offline base (``random``, ``pretrain:digits``) has no Hugging Face checkpoint
  to name, so ``base`` (its variables) is written as ``workdir/base_hf`` and named instead.
  Every process calls this (arrays split across processes are gathered); process 0 writes.
  """
  path = os.path.abspath(os.path.join(config.workdir, "peft"))
  source = config.model.source
  trainable = tuple(config.lora.trainable)
  host = on_host(params)
  if source in validation.LOCAL_MODELS:
    source = os.path.abspath(os.path.join(config.workdir, "base_hf"))
    if jax.process_index() == 0:
      hf_vit.save_hf_vit(source, model, on_host(base)["params"], class_names, overwrite=True)
  elif os.path.exists(source):
    source = os.path.abspath(source)
  if jax.process_index() == 0:
    modules = hf_vit.peft_modules(model, prefix="params")
    lora_fn.save_peft(
      path,
      host,
      modules=modules,
      trainable=trainable,
      base_model_name_or_path=source,
      overwrite=True,
    )
    # Informational: vLLM serves language models, and a classifier trains its head.
    problems = lora_fn.serving_problems(host, trainable=trainable)
    print(f"PEFT adapter on {source} written to {path}")
    print(f"  what vLLM would refuse in it: {'; '.join(problems) if problems else 'nothing'}")
  return path


def export_hf(config: Any, model: Any, params: Any, class_names: list[str]) -> str:
  """Writes ``params``, LoRA merged, as a Hugging Face checkpoint, ``workdir/merged_hf``.

  ``transformers.ViTForImageClassification.from_pretrained(path)`` loads it as a plain model.
  Every process calls this (the merge runs where the weights are); process 0 writes.
  """
  path = os.path.abspath(os.path.join(config.workdir, "merged_hf"))
  merged = on_host(lora_fn.merge(params))
  if jax.process_index() == 0:
    hf_vit.save_hf_vit(path, model, merged["params"], class_names, overwrite=True)
    print(f"merged model for transformers written to {path}")
  return path


def init_distributed(config: Any) -> None:
  """``jax.distributed.initialize`` for a multi-process run; call before any other JAX call."""
  env = os.environ
  multi = (
    bool(config.dist.coordinator)
    or "JAX_COORDINATOR_ADDRESS" in env
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if not multi or jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU hosts
  if config.dist.coordinator:
    jax.distributed.initialize(
      config.dist.coordinator,
      num_processes=config.dist.num_processes or None,
      process_id=None if config.dist.process_id < 0 else config.dist.process_id,
    )
  else:
    jax.distributed.initialize()  # the cluster (TPU pod, SLURM, MPI) describes itself


def make_optimizer(
  config: Any, params: Any, trainable: Any, updates: int
) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """``config.optim``'s schedule (warm-up, cosine decay over ``updates``) and AdamW.

  Clipped by global norm, and updating only the adapters and ``trainable`` (``lora_fn.optimizer``).
  """
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.optim.lr,
    max(int(config.optim.warmup_fraction * updates), 1),
    max(updates, 2),
  )
  tx = lora_fn.optimizer(
    optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip),
      optax.adamw(schedule, weight_decay=config.optim.weight_decay),
    ),
    params,
    trainable=trainable,
  )
  return schedule, tx


def init_state(
  tx: optax.GradientTransformation, params: Any, trainable: Any
) -> tuple[dict[str, Any], Any]:
  """``({"trainable", "opt_state"}, frozen)``: the train state, sharded as ``params`` are."""
  trainable, frozen = lora_fn.split(params, trainable=trainable)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; the base keeps its own
  opt_shardings = lora_fn.state_shardings(jax.eval_shape(tx.init, trainable), trainable)
  state = {
    "trainable": trainable,
    "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(trainable),
  }
  return state, frozen


def make_train_step(
  model: Any, tx: optax.GradientTransformation, key: jax.Array, shardings: tuple[Any, ...]
) -> Callable[..., tuple[dict[str, Any], jax.Array]]:
  """The jitted step ``(state, frozen, batch, step) -> (state, loss)``; ``state`` is donated.

  ``state`` is ``{"trainable": ..., "opt_state": ...}``. The dropout key of a step is
  ``fold_in(key, step)``, so the step number is the whole RNG state of a resumed run.
  """
  apply = lora_fn.lora(model.apply)  # built once: its trace cache serves every step

  def train_step(state, frozen, batch, step):
    def loss_fn(trainable):
      logits = apply(
        lora_fn.combine(trainable, frozen),
        batch["image"].astype(model.dtype),
        dropout_key=jax.random.fold_in(key, step),
      )
      return xent(logits, batch["label"], batch["valid"])

    loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    return {"trainable": trainable, "opt_state": opt_state}, loss

  state_shardings, frozen_shardings, data_sharding, replicated = shardings
  # jit with explicit shardings (what pjit did): state and batch in, state out, donated.
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, frozen_shardings, data_sharding, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def log_losses(
  pending: list[tuple[int, jax.Array]],
  log: metrics_lib.Writer,
  schedule: optax.Schedule,
  last_good: int | None,
  workdir: str,
) -> list[tuple[int, float]]:
  """Fetches and logs the pending losses; stops the run at the first that is not finite.

  Called before every checkpoint too, so a non-finite state is never saved.
  """
  losses = [(s, float(l)) for s, l in pending]
  pending.clear()
  for s, l in losses:
    if not math.isfinite(l):
      kept = (
        f"the last good checkpoint (step {last_good}) is kept in {workdir}/checkpoints"
        if last_good is not None
        else "no checkpoint had been saved yet"
      )
      raise FloatingPointError(f"the loss is not finite ({l}) at step {s}; stopping: {kept}.")
    log.scalars(s, "train", {"loss": l, "lr": float(schedule(s))})
  return losses


class StopSignals:
  """SIGINT/SIGTERM only set a flag while the loop runs: it stops at a step boundary and saves.

  So no exception ever lands inside a checkpoint write. A second signal gets the handler
  that was there before (stop at once). Handlers can only be set in the main thread; in any
  other the run is not interruptible this way.
  """

  def __init__(self) -> None:
    self.received: list[int] = []
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._request)
    return self

  def _request(self, signum: int, frame: Any) -> None:
    del frame
    self.received.append(signum)
    signal.signal(signum, self._previous[signum])

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, can_agree: bool) -> bool:
    """Whether to stop now; processes agree (at steps where all wait anyway) and stop together.

    A signal may reach only some processes of a multi-process run.
    """
    stopping = bool(self.received)  # read once: a signal may land any time
    if jax.process_count() == 1:
      return stopping
    return can_agree and bool(np.max(multihost_utils.process_allgather(np.int32(stopping))))


def train_and_evaluate(config: Any) -> dict[str, Any]:
  """Runs a whole training job: set-up, resume, train, evaluate, results.

  Args:
    config: a run config (``configs/*.py``'s ``get_config()``, overrides applied).

  Returns:
    ``workdir``; ``step`` (the last step trained) and ``interrupted`` (a signal stopped the
    run there); ``best_accuracy`` (-1.0 before any eval) and ``best_adapter`` (its path);
    ``curves`` (the plot's path, ``None`` if interrupted); ``merged`` (the merged weights'
    path or ``None``); ``peft`` and ``merged_hf`` (the best adapter as a PEFT directory and
    merged as a Hugging Face checkpoint, with ``export_peft`` / ``export_hf``, else ``None``);
    ``baselines`` (accuracy by method, with ``compare_baselines``).

  Raises:
    ConfigError: a mistake in the config, or a library ``ValueError`` while setting up.
    FloatingPointError: the loss stopped being finite.
  """
  # --------------------------------------------------------------------------------- Config
  validation.validate_config(config)
  init_distributed(config)
  workdir = config.workdir
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  n_proc = jax.process_count()
  # Setting up, the library's ValueErrors (a target that matches nothing, a mesh that does
  # not fit the devices, a resume with another rank) are mistakes in the config.
  with validation.user_errors():
    mesh = lora_fn.make_mesh(config.mesh)
    batch_shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if config.batch_size % batch_shards or batch_shards % n_proc:
      raise ConfigError(
        f"config.batch_size {config.batch_size} must divide evenly over the mesh's data x fsdp = "
        f"{batch_shards} batch shards, and those over the {n_proc} processes (each process "
        f"feeds its own rows); --config.mesh={config.mesh!r}"
      )
    host_batch = config.batch_size // n_proc
    data_sharding = lora_fn.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())

    # ------------------------------------------------------------------------------- Data
    train_split, eval_split = load_splits(config)
    class_names = train_split.class_names
    num_classes = len(class_names)
    validation.validate_data(config, len(train_split), len(eval_split), num_classes, n_proc)
    steps_per_epoch = (len(train_split) // n_proc) // host_batch  # the smallest host shard's
    total_steps = steps_per_epoch * config.epochs
    train_ds = data_lib.batches(
      train_split,
      batch_size=host_batch,
      seed=config.seed,
      train=True,
      image_size=config.data.image_size,
      epochs=config.epochs,
      crop_scale=config.data.crop_scale,
      flip=config.data.flip,
    )

    # ------------------------------------------------------------------------------ Model
    model, base = load_base(config, num_classes, workdir)
    params = wrap_base(config, model, base)
    trainable_spec = tuple(config.lora.trainable)
    if config.export_peft:
      check_peft_export(model, params, trainable_spec)
    if is_main:
      print(lora_fn.summary(params, trainable=trainable_spec))
    # Every weight on the mesh: LoRA factors follow their base's spec (rank axis replicated).
    params = lora_fn.shard(params, mesh, config.sharding, min_size=config.shard_min_size)

    # -------------------------------------------------------------------- Optimizer, step
    schedule, tx = make_optimizer(config, params, trainable_spec, total_steps)
    state, frozen = init_state(tx, params, trainable_spec)
    shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    train_step = make_train_step(
      model,
      tx,
      jax.random.key(config.seed + 2),
      (shardings_of(state), shardings_of(frozen), data_sharding, replicated),
    )
    apply = lora_fn.lora(model.apply)
    eval_apply = lambda p, x: apply(p, x.astype(model.dtype))  # one function: compiled once

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
      """This process's rows of the global batch, spread over the mesh's batch shards."""
      return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}

    # ---------------------------------------------------------------------- Checkpoints
    meta = {
      "adapter": lora_fn.adapter_config(params, trainable=trainable_spec),
      "base_model": config.model.source,
      "class_names": class_names,
      "config": config.to_dict(),
    }
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpts = checkpoint_lib.Checkpoints(
      ckpt_dir if "://" in ckpt_dir else os.path.abspath(ckpt_dir), keep=config.keep_checkpoints
    )

    def check_meta(saved: dict[str, Any]) -> None:
      """Raises if this run cannot resume from a checkpoint with this meta."""
      if not isinstance(saved.get("adapter"), dict) or "base_model" not in saved:
        raise checkpoint_lib.DamagedCheckpoint("its meta lacks the adapter config")
      where = f"checkpoint directory {ckpt_dir!r}"
      lora_fn.check_adapter_config(saved["adapter"], meta["adapter"], where)
      if saved["base_model"] != config.model.source:
        raise ConfigError(
          f"{where} was trained on base model {saved['base_model']!r}, not "
          f"{config.model.source!r}; use another --config.workdir."
        )

    start, best = 0, -1.0  # best eval accuracy: the same on every process
    restored = ckpts.restore_latest(state, check_meta=check_meta)
    if restored is not None:
      start, state, saved = restored
      best = saved.get("best_accuracy", -1.0)
      if start > total_steps:
        raise ConfigError(
          f"the checkpoint in {ckpt_dir!r} is at step {start}, past this run's {total_steps} "
          f"steps ({config.epochs} epochs of {steps_per_epoch}); use another --config.workdir "
          "or more epochs"
        )
      print(f"resumed from the checkpoint at step {start}")

  def save(step: int) -> None:
    # Batches are indexed by step and the dropout key is fold_in(key, step), so the step is
    # both the data position and the RNG state.
    progress = {
      "step": step,
      "best_accuracy": best,
      "data_position": {"batch": step, "examples": step * config.batch_size},
      "rng": {"seed": config.seed + 2, "per_step": "fold_in(key, step)"},
    }
    ckpts.save(step, state, meta | progress)

  # ----------------------------------------------------------------------------------- Train
  log = metrics_lib.Writer(workdir, enabled=is_main)
  bar = metrics_lib.progress(total_steps, start, enabled=is_main)
  batches = data_lib.iterate(train_ds, start, config.data.workers)
  pending: list[tuple[int, jax.Array]] = []
  skipped, seen, t0 = 0, 0, time.perf_counter()
  step, interrupted = start, False
  # Closing waits for the last checkpoint write, also when the loop stops on an exception.
  with StopSignals() as signals, contextlib.closing(ckpts), contextlib.closing(bar):
    for step in range(start + 1, total_steps + 1):
      batch = next(batches)
      skipped += int(batch["valid"].size - batch["valid"].sum())
      seen += len(batch["label"])
      state, loss = train_step(state, frozen, to_global(batch), step)
      pending.append((step, loss))
      bar.update(1)
      is_log = step % config.log_every_steps == 0 or step == total_steps
      interrupted = signals.agreed(can_agree=is_log)
      is_save = step % config.checkpoint_every_steps == 0 or step == total_steps or interrupted
      is_eval = step == total_steps or (
        step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.eval_every_epochs == 0
      )
      if is_log or is_save:
        losses = log_losses(pending, log, schedule, ckpts.latest_step(), workdir)
      if is_log:
        rate = seen / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{losses[-1][1]:.4f}", img_s=f"{rate:.1f}", skipped=skipped)
        log.scalars(step, "train", {"images_per_s": rate, "skipped_images": skipped})
      if is_eval:  # also when stopping: a resumed run starts after this step
        scores, logits = evaluate(
          eval_apply,
          lora_fn.combine(state["trainable"], frozen),
          eval_split,
          config,
          host_batch,
          class_names,
          return_logits=True,
          sharding=data_sharding,
        )
        log.scalars(step, "eval", scores)
        if is_main:
          accuracy, f1 = scores["accuracy"], scores["macro_f1"]
          bar.write(f"step {step}: eval accuracy {accuracy:.4f}, macro-F1 {f1:.4f}")
        if scores["accuracy"] > best:  # every process: Orbax writes sharded arrays together
          best = scores["accuracy"]
          params = lora_fn.combine(state["trainable"], frozen)
          log.save_best_adapter(params, trainable_spec, meta, logits)
      if is_save and ckpts.latest_step() != step:
        save(step)  # after the eval: it records the best accuracy so far
      if interrupted:
        bar.write(f"interrupted at step {step}: saved a checkpoint, stopping")
        break
  params = lora_fn.combine(state["trainable"], frozen)
  result = {
    "workdir": workdir,
    "step": step,
    "interrupted": interrupted,
    "best_accuracy": best,
    "best_adapter": os.path.join(workdir, "best_adapter"),
    "curves": None,
    "merged": None,
    "peft": None,
    "merged_hf": None,
    "baselines": None,
  }
  if interrupted:
    log.close()
    return result

  # --------------------------------------------------------------------------------- Results
  if is_main:
    result["curves"] = os.path.join(workdir, "curves.png")
    log.plot(result["curves"])
    print(f"skipped {skipped} unreadable images; curves in {result['curves']}")
  if config.export_peft or config.export_hf:  # every process: the arrays may be split
    best_params = lora_fn.restore_adapter(result["best_adapter"], params, trainable=trainable_spec)
    if config.export_peft:
      result["peft"] = export_peft(config, model, best_params, base, class_names)
    if config.export_hf:
      result["merged_hf"] = export_hf(config, model, best_params, class_names)
  if config.export_merged:  # every process: the merged weights are sharded like the base
    result["merged"] = os.path.abspath(os.path.join(workdir, "merged"))
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(result["merged"], lora_fn.merge(params), force=True)
    if is_main:
      print(f"merged parameters (W + s·BA) written to {result['merged']}")
  log.close()
  if config.compare_baselines and n_proc > 1:
    print("compare_baselines runs in single-process runs only; skipped")
  elif config.compare_baselines:
    result["baselines"] = digits_demo.compare_baselines(
      config, model, base, params, train_ds, eval_split, class_names, total_steps
    )
  return result


def main(argv: list[str]) -> None:
  """The CLI: a mistake in the config is one paragraph on stderr and exit status 2."""
  del argv
  config = _CONFIG.value
  debug = _DEBUG.value or os.environ.get("LORAX_FN_DEBUG", "") not in ("", "0")
  if config is None:
    _exit_user_error("--config is required, e.g. --config configs/digits.py")
  try:
    result = train_and_evaluate(config)
  except ConfigError as e:
    if debug:
      raise
    _exit_user_error(str(e))
  except FloatingPointError as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if result["interrupted"]:
    sys.exit(130)


def _exit_user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def load_config_file(spec: str) -> Any:
  """``get_config(arg)`` of ``path[:arg]``, as ``--config`` loads it."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; an unknown ``--config.key`` exits (status 2) with the valid keys."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl wraps the ConfigDict error variously
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
      spec = argv[argv.index("--config") + 1]
    for arg in argv:
      if not arg.startswith("--config.") or spec is None:
        continue
      key = arg[len("--config.") :].split("=", 1)[0]
      node, parts = load_config_file(spec), key.split(".")
      for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
          where = ".".join(parts[:i]) or "the config"
          valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(a value)"
          _exit_user_error(f"unknown config key {key!r}; valid keys under {where}: {valid}")
        node = node[part]
    _exit_user_error(str(e))


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
