"""Loss and evaluation for ``train/run.py``: cross-entropy, accuracy and macro-F1 of a split."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import data as data_lib
import jax
import jax.numpy as jnp
import metrics as metrics_lib
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def xent(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean cross-entropy over the valid (decodable) examples of a batch."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def evaluate(
  apply: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  split: data_lib.Split,
  config: Any,
  batch_size: int,
  class_names: Sequence[str] | None = None,
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
def _jit_logits(apply: Callable) -> Callable:
  return jax.jit(apply)
