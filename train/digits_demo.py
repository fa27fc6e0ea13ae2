"""The offline demo of ``configs/digits.py``: a base ViT pre-trained here, and two baselines.

``model.source = "pretrain:digits"`` trains a small ViT from scratch on the digits in
``model.pretrain_classes`` (cached in ``workdir/base``); the LoRA run then adapts it to
``data.classes`` with a fresh head. ``compare_baselines`` trains full fine-tuning and a linear
probe (the head only) with the same data, steps and schedule, and prints the three accuracies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import data as data_lib
import grain
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from evaluation import evaluate, xent

import lorax_fn as lora_fn


def pretrained_base(config: Any, model: Any, num_classes: int, path: str) -> dict[str, Any]:
  """The base pre-trained on ``model.pretrain_classes``, with a zero head of ``num_classes``.

  The head is new, as a Hugging Face checkpoint's is: its shape follows the classes asked
  for, not the pre-training classes.
  """
  variables = pretrain(config, model, path)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  head = jax.eval_shape(model.init, jax.random.key(config.seed), images)["params"]["head"]
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head)
  return {**variables, "params": {**variables["params"], "head": head}}


def pretrain(config: Any, model: Any, path: str) -> dict[str, Any]:
  """Trains the base ViT from scratch on ``model.pretrain_classes`` (cached in ``path``)."""
  size = config.data.image_size
  train, test = data_lib.digits(config.model.pretrain_classes, image_size=size)
  pre = model.clone(num_classes=len(train.class_names))
  variables = pre.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)))
  ckpt = ocp.StandardCheckpointer()
  if os.path.exists(path):
    return ckpt.restore(os.path.abspath(path), variables)
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, 1000), weight_decay=1e-4)

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
  acc = evaluate(pre.apply, variables, test, config, 32)["accuracy"]
  print(
    f"pre-trained the base ViT on digits {list(config.model.pretrain_classes)}: "
    f"held-out accuracy {acc:.3f}"
  )
  ckpt.save(os.path.abspath(path), variables)
  ckpt.wait_until_finished()
  return variables


def compare_baselines(
  config: Any,
  model: Any,
  base: Any,
  lora_params: Any,
  train_ds: grain.MapDataset,
  eval_split: data_lib.Split,
  class_names: Sequence[str],
  steps: int,
) -> dict[str, float]:
  """Full fine-tuning and a linear probe with the same data, steps and schedule, for reference.

  Returns:
    Held-out accuracy by method (``"LoRA"``, ``"full fine-tune"``, ``"linear probe"``), also
    printed as a table.
  """
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
  trained = lora_fn.summary(lora_params, trainable=tuple(config.lora.trainable))
  print("\nheld-out accuracy on the new classes, same steps and data:")
  for name, acc in results.items():
    print(f"  {name:<15} {acc:.4f}")
  print(f"  (LoRA: {trained.splitlines()[0]})")
  return results


def _train_baseline(
  config: Any,
  model: Any,
  base: Any,
  train_ds: grain.MapDataset,
  eval_split: data_lib.Split,
  class_names: Sequence[str],
  lr: optax.Schedule,
  lr_scale: float,
  mask: Callable[[str], bool],
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
