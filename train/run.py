"""LoRA fine-tuning of a ViT: one readable script, top to bottom (big_vision style).

    python train/run.py --config configs/vit_food101.py            # ViT-B/16 on Food-101
    python train/run.py --config configs/digits.py                 # offline default, minutes
    python train/run.py --config configs/vit_food101.py --config.lora.rank=8 --config.epochs=1

Only the adapters and the head are trained (``lorax_fn.optimizer``); the frozen base never
gets a gradient and is never written to a checkpoint. Checkpoints (adapters + head +
optimizer state + step + key) are saved every ``checkpoint_every_steps`` and the run resumes
from the latest one automatically; batches are indexed by step, so a resumed run reads the
same data as an uninterrupted one. Metrics go to ``workdir/metrics.jsonl`` and TensorBoard
(``workdir/tb``); ``workdir/curves.png`` plots them at the end.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_lib
import hf_vit
import metrics as metrics_lib
import vit as vit_lib

import lorax_fn as lora_fn

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)


def xent(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean cross-entropy over the valid (decodable) examples of a batch."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def load_splits(config) -> tuple[data_lib.Split, data_lib.Split]:
  if config.data.name == "digits":
    return data_lib.digits(config.data.classes, image_size=config.data.image_size)
  return (
    data_lib.load_hf(config.data.name, config.data.path, config.data.train_split),
    data_lib.load_hf(config.data.name, config.data.path, config.data.eval_split),
  )


def load_base(config, num_classes: int, workdir: str) -> tuple[Any, Any]:
  """The frozen base model: a Hugging Face ViT, or (offline default) one pre-trained here."""
  key = jax.random.key(config.seed)
  dtype = jnp.dtype(config.model.compute_dtype)
  if config.model.source in ("pretrain:digits", "random"):
    if config.model.source == "pretrain:digits" and jax.process_count() > 1:
      raise ValueError("model.source 'pretrain:digits' (the offline demo) runs in one process")
    model = vit_lib.ViT(num_classes=num_classes, dtype=dtype, **config.model.preset)
    if config.model.source == "random":
      size = config.data.image_size
      return model, model.init(key, jnp.zeros((1, size, size, 3)))
    variables = pretrain_digits(config, model, os.path.join(workdir, "base"))
    # A fresh (zero) classifier for the new classes, as a Hugging Face checkpoint gets.
    head = jax.tree.map(jnp.zeros_like, variables["params"]["head"])
    return model, {**variables, "params": {**variables["params"], "head": head}}
  model, variables = hf_vit.load_hf_vit(
    config.model.source, num_classes=num_classes, key=key, scan_layers=config.model.scan_layers
  )
  return model.clone(remat=config.model.remat, dtype=dtype), variables


def pretrain_digits(config, model, path: str) -> Any:
  """Trains the base ViT from scratch on digits 0-4 (cached in ``path``)."""
  ckpt = ocp.StandardCheckpointer()
  size = config.data.image_size
  train, test = data_lib.digits(config.model.pretrain_classes, image_size=size)
  variables = model.clone(num_classes=len(train.class_names)).init(
    jax.random.key(config.seed), jnp.zeros((1, size, size, 3))
  )
  if os.path.exists(path):
    return ckpt.restore(os.path.abspath(path), variables)
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, 1000), weight_decay=1e-4)
  pre = model.clone(num_classes=len(train.class_names))

  @jax.jit
  def step(variables, opt_state, batch):
    def loss_fn(v):
      return xent(pre.apply(v, batch["image"]), batch["label"], batch["valid"])

    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  ds = data_lib.batches(
    train,
    batch_size=32,
    seed=config.seed + 7,
    train=True,
    image_size=size,
    epochs=config.model.pretrain_epochs,
    crop_scale=config.data.crop_scale,
    flip=False,
  )
  opt_state = tx.init(variables)
  for batch in data_lib.iterate(ds, 0, 0):
    variables, opt_state, _ = step(variables, opt_state, batch)
  acc = evaluate(lambda v, x: pre.apply(v, x), variables, test, config, 32)["accuracy"]
  print(
    f"pre-trained the base ViT on digits {list(config.model.pretrain_classes)}: "
    f"held-out accuracy {acc:.3f}"
  )
  ckpt.save(os.path.abspath(path), variables)
  ckpt.wait_until_finished()
  return variables


def evaluate(
  apply,
  params,
  split: data_lib.Split,
  config,
  batch_size: int,
  class_names=None,
  return_logits: bool = False,
  sharding: NamedSharding | None = None,
) -> Any:
  """Accuracy and macro-F1 over the split, and the logits if asked.

  ``batch_size`` is per process. With ``sharding`` (multi-device runs) each process feeds its
  shard of the split into global batches and every process gets all logits back, so the
  metrics are over the whole split everywhere; all processes run the same number of batches
  (one that has run out feeds masked-out blanks).
  """
  ds = data_lib.batches(
    split,
    batch_size=batch_size,
    seed=0,
    train=False,
    image_size=config.data.image_size,
    class_names=class_names,
  )
  n_proc = jax.process_count()
  limit = min(config.data.eval_limit or len(split), len(split))
  num_batches = math.ceil(math.ceil(limit / n_proc) / batch_size)
  size = config.data.image_size
  blank = {
    "image": np.zeros((0, size, size, 3), np.float32),
    "label": np.zeros((0,), np.int32),
    "valid": np.zeros((0,), np.int32),
    "index": np.zeros((0,), np.int32),
  }
  preds, labels, kept, order = [], [], [], []
  run = _jit_logits(apply)
  batches = data_lib.iterate(ds, 0, config.data.workers)
  for _ in range(num_batches):
    batch = next(batches, blank)
    n = len(batch["label"])
    padded = {
      k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
      for k, v in batch.items()
    }  # one compiled shape for the last batch too; padding is masked out by "valid"
    if sharding is None:
      logits = np.asarray(run(params, padded["image"]))
    else:
      # Global arrays gathered the same way keep logits, labels and masks row-aligned
      # whatever order the mesh gives the processes' rows.
      glob = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in padded.items()}
      logits = run(params, glob.pop("image"))
      logits, padded = jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), (logits, glob)
      )
    keep = padded["valid"].astype(bool)
    preds.append(logits.argmax(-1)[keep])
    labels.append(padded["label"][keep])
    kept.append(logits[keep])
    order.append(padded["index"][keep])
  result = metrics_lib.classification(np.concatenate(preds), np.concatenate(labels))
  # The logits in dataset order, whichever process evaluated each example.
  logits = np.concatenate(kept)[np.argsort(np.concatenate(order), kind="stable")]
  return (result, logits) if return_logits else result


@functools.lru_cache(maxsize=8)
def _jit_logits(apply):
  return jax.jit(apply)


def check_finite(
  pending: list[tuple[int, Any]], last_good: int | None, workdir: str
) -> list[tuple[int, float]]:
  """Fetches the pending losses; stops the run at the first one that is not finite."""
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
  return losses


def flatten_state(tree: Any) -> dict[str, Any]:
  """Orbax-friendly ``{"00000": array, ...}`` of a pytree (``None`` gaps and all)."""
  return {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def unflatten_state(like: Any, flat: dict[str, Any]) -> Any:
  return jax.tree.unflatten(jax.tree.structure(like), [flat[k] for k in sorted(flat)])


def init_distributed(config) -> None:
  """``jax.distributed.initialize`` for a multi-process run; call before any other JAX call."""
  env = os.environ
  multi = (
    bool(config.dist.coordinator)
    or "JAX_COORDINATOR_ADDRESS" in env
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if not multi:
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


def main(argv: list[str]) -> None:
  del argv
  config = _CONFIG.value
  init_distributed(config)
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = lora_fn.make_mesh(config.mesh)
  n_proc = jax.process_count()
  batch_shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  if config.batch_size % batch_shards or batch_shards % n_proc:
    raise ValueError(
      f"batch_size {config.batch_size} must divide evenly over the mesh's data x fsdp = "
      f"{batch_shards} batch shards, and those over the {n_proc} processes (each process "
      f"feeds its own rows); --config.mesh={config.mesh!r}"
    )
  host_batch = config.batch_size // n_proc
  data_sharding = lora_fn.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())

  # ------------------------------------------------------------------------------ Data
  train_split, eval_split = load_splits(config)
  class_names = train_split.class_names
  num_classes = len(class_names)
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
  layouts = lora_fn.infer_layouts(
    model.apply, base, jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
  )
  params = lora_fn.wrap(
    base,
    rank=config.lora.rank,
    alpha=config.lora.alpha,
    targets=tuple(config.lora.targets),
    dropout=config.lora.dropout,
    rslora=config.lora.rslora,
    layouts=layouts,
    key=jax.random.key(config.seed + 1),
  )
  trainable_spec = tuple(config.lora.trainable)
  if is_main:
    print(lora_fn.summary(params, trainable=trainable_spec))
  # Every weight on the mesh: LoRA factors follow their base's spec (the rank axis replicated).
  params = lora_fn.shard(params, mesh, config.sharding, min_size=config.shard_min_size)

  # ------------------------------------------------------------------------------ Optimizer
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.optim.lr,
    max(int(config.optim.warmup_fraction * total_steps), 1),
    max(total_steps, 2),
  )
  tx = lora_fn.optimizer(
    optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip),
      optax.adamw(schedule, weight_decay=config.optim.weight_decay),
    ),
    params,
    trainable=trainable_spec,
  )
  trainable, frozen = lora_fn.split(params, trainable=trainable_spec)
  trainable = jax.tree.map(jnp.copy, trainable)  # the train step donates it; the base keeps its own
  opt_shardings = lora_fn.state_shardings(jax.eval_shape(tx.init, trainable), trainable)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  apply = lora_fn.lora(model.apply)
  key = jax.random.key(config.seed + 2)
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  trainable_shardings = shardings_of(trainable)

  def train_step(trainable, opt_state, frozen, batch, step):
    def loss_fn(t):
      logits = apply(
        lora_fn.combine(t, frozen),
        batch["image"].astype(model.dtype),
        dropout_key=jax.random.fold_in(key, step),
      )
      return xent(logits, batch["label"], batch["valid"])

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  # jit with explicit shardings (what pjit did): state and batch in, state out, donated.
  train_step = jax.jit(
    train_step,
    in_shardings=(
      trainable_shardings,
      opt_shardings,
      shardings_of(frozen),
      data_sharding,
      replicated,
    ),
    out_shardings=(trainable_shardings, opt_shardings, replicated),
    donate_argnums=(0, 1),
  )

  def eval_apply(p: Any, x: jax.Array) -> jax.Array:  # one function: compiled once
    return apply(p, x.astype(model.dtype))

  def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the global batch, spread over the mesh's batch shards."""
    return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}

  # ------------------------------------------------------------------------------ Checkpoints
  adapter_config = lora_fn.adapter_config(params, trainable=trainable_spec)
  meta = {
    "adapter": adapter_config,
    "base_model": config.model.source,
    "class_names": class_names,
    "config": config.to_dict(),
  }
  mngr = ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")),
    options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints),
    item_names=("state", "meta"),
  )
  start, best = 0, -1.0  # best eval accuracy: the same on every process
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    saved = mngr.restore(start, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    where = f"checkpoint directory {os.path.join(workdir, 'checkpoints')!r}"
    lora_fn.check_adapter_config(saved["adapter"], adapter_config, where)
    if saved["base_model"] != config.model.source:
      raise ValueError(
        f"{where} was trained on base model {saved['base_model']!r}, not "
        f"{config.model.source!r}; use another --config.workdir."
      )
    like = {"trainable": trainable, "opt_state": opt_state}
    state = mngr.restore(
      start, args=ocp.args.Composite(state=ocp.args.StandardRestore(flatten_state(like)))
    )["state"]
    state = unflatten_state(like, state)
    trainable, opt_state = state["trainable"], state["opt_state"]
    best = saved.get("best_accuracy", -1.0)
    print(f"resumed from the checkpoint at step {start}")

  def save(step: int) -> None:
    state = flatten_state({"trainable": trainable, "opt_state": opt_state})
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        # Batches are indexed by step and the dropout key is fold_in(key, step), so the step
        # is both the data position and the RNG state.
        meta=ocp.args.JsonSave(
          meta
          | {
            "step": step,
            "best_accuracy": best,
            "data_position": {"batch": step, "examples": step * config.batch_size},
            "rng": {"seed": config.seed + 2, "per_step": "fold_in(key, step)"},
          }
        ),
      ),
    )

  # ------------------------------------------------------------------------------ Train
  log = metrics_lib.Writer(workdir, enabled=is_main)
  bar = metrics_lib.progress(total_steps, start, enabled=is_main)
  batches = data_lib.iterate(train_ds, start, config.data.workers)
  pending: list[tuple[int, jax.Array]] = []
  skipped, seen, t0 = 0, 0, time.perf_counter()
  step = start
  # SIGINT/SIGTERM only set a flag: the loop stops at a step boundary, saves and exits, so
  # no exception ever lands inside a checkpoint write. A second signal stops at once.
  stop: list[int] = []

  def request_stop(signum: int, frame: Any) -> None:
    del frame
    stop.append(signum)
    signal.signal(signum, signal.SIG_DFL)

  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, request_stop)
  for step in range(start + 1, total_steps + 1):
    batch = next(batches)
    skipped += int(batch["valid"].size - batch["valid"].sum())
    seen += len(batch["label"])
    trainable, opt_state, loss = train_step(trainable, opt_state, frozen, to_global(batch), step)
    pending.append((step, loss))
    if step % config.log_every_steps == 0 or step == total_steps:
      losses = check_finite(pending, mngr.latest_step(), workdir)
      rate = seen / (time.perf_counter() - t0)
      for s, l in losses:
        log.scalars(s, "train", {"loss": l, "lr": float(schedule(s))})
      bar.set_postfix(loss=f"{losses[-1][1]:.4f}", img_s=f"{rate:.1f}", skipped=skipped)
      log.scalars(step, "train", {"images_per_s": rate, "skipped_images": skipped})
    bar.update(1)
    epoch_end = step % steps_per_epoch == 0
    if (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0) or (
      step == total_steps
    ):
      result, logits = evaluate(
        eval_apply,
        lora_fn.combine(trainable, frozen),
        eval_split,
        config,
        host_batch,
        class_names,
        return_logits=True,
        sharding=data_sharding,
      )
      log.scalars(step, "eval", result)
      if is_main:
        bar.write(
          f"step {step}: eval accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
        )
      if result["accuracy"] > best:  # every process: Orbax writes sharded arrays together
        best = result["accuracy"]
        log.save_best_adapter(lora_fn.combine(trainable, frozen), trainable_spec, meta, logits)
    if step % config.checkpoint_every_steps == 0:
      for s, l in check_finite(pending, mngr.latest_step(), workdir):  # never save NaNs
        log.scalars(s, "train", {"loss": l, "lr": float(schedule(s))})
      save(step)  # after the eval: it records the best accuracy so far
    if step == config.debug_kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
    # A signal may reach only some processes: they agree (at each logging step, where the
    # loop waits for the device anyway) and all stop at the same step boundary.
    stopping = bool(stop)  # read once: a signal may land any time
    if n_proc > 1:
      agree = step % config.log_every_steps == 0 or step == total_steps
      stopping = agree and bool(np.max(multihost_utils.process_allgather(np.int32(stopping))))
    if stopping:
      for s, l in check_finite(pending, mngr.latest_step(), workdir):  # never save NaNs
        log.scalars(s, "train", {"loss": l, "lr": float(schedule(s))})
      bar.write(f"interrupted at step {step}: saving a checkpoint, then stopping")
      if mngr.latest_step() != step:
        save(step)
      mngr.wait_until_finished()
      sys.exit(130)
  bar.close()
  if mngr.latest_step() != total_steps:
    save(total_steps)
  mngr.wait_until_finished()
  params = lora_fn.combine(trainable, frozen)

  # ------------------------------------------------------------------------------ Results
  if is_main:
    log.plot(os.path.join(workdir, "curves.png"))
    print(f"skipped {skipped} unreadable images; curves in {workdir}/curves.png")
  if config.export_merged:  # every process: the merged weights are sharded like the base
    path = os.path.abspath(os.path.join(workdir, "merged"))
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, lora_fn.merge(params), force=True)
    if is_main:
      print(f"merged parameters (W + s·BA) written to {path}")
  log.close()
  if config.compare_baselines:
    if n_proc > 1:
      print("compare_baselines runs in single-process runs only; skipped")
    else:
      compare_baselines(config, model, base, params, train_ds, eval_split, class_names, total_steps)


def compare_baselines(
  config, model, base, lora_params, train_ds, eval_split, class_names, steps
) -> None:
  """Full fine-tuning and a linear probe with the same data, steps and schedule, for reference."""
  lr = optax.warmup_cosine_decay_schedule(0.0, config.optim.lr, max(steps // 20, 1), steps)
  results = {
    "LoRA": evaluate(
      lora_fn.lora(model.apply), lora_params, eval_split, config, config.batch_size, class_names
    )["accuracy"]
  }
  for name, lr_scale, mask in (
    ("full fine-tune", 0.1, lambda path: True),
    ("linear probe", 1.0, lambda path: "head" in path),
  ):
    results[name] = _train_baseline(
      config, model, base, train_ds, eval_split, class_names, lr, lr_scale, mask
    )
  trained = {"LoRA": lora_fn.summary(lora_params, trainable=tuple(config.lora.trainable))}
  print("\nheld-out accuracy on the new classes, same steps and data:")
  for name, acc in results.items():
    print(f"  {name:<15} {acc:.4f}")
  print(f"  (LoRA: {trained['LoRA'].splitlines()[0]})")


def _train_baseline(
  config, model, base, train_ds, eval_split, class_names, lr, lr_scale, mask
) -> float:
  labels = jax.tree_util.tree_map_with_path(
    lambda p, _: "train" if mask(jax.tree_util.keystr(p)) else "freeze", base
  )
  tx = optax.multi_transform(
    {
      "train": optax.adamw(lambda s: lr_scale * lr(s), weight_decay=config.optim.weight_decay),
      "freeze": optax.set_to_zero(),
    },
    labels,
  )

  @jax.jit
  def step_fn(p, o, batch):
    loss_fn = lambda p: xent(model.apply(p, batch["image"]), batch["label"], batch["valid"])
    grads = jax.grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  p, o = base, tx.init(base)
  for batch in data_lib.iterate(train_ds, 0, config.data.workers):
    p, o = step_fn(p, o, batch)
  return evaluate(model.apply, p, eval_split, config, config.batch_size, class_names)["accuracy"]


def load_config_file(spec: str) -> Any:
  """``get_config(arg)`` of ``path[:arg]``, as ``--config`` loads it."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; an unknown ``--config.key`` exits with the valid keys listed."""
  from absl import flags

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
          sys.exit(f"error: unknown config key {key!r}; valid keys under {where}: {valid}")
        node = node[part]
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=parse_flags)
