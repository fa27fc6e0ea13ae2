"""Metrics and logs for ``train/run.py``: JSONL, TensorBoard, a progress bar, a PNG plot."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

import lorax_fn as lora_fn


def classification(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Accuracy and macro-F1 (the mean F1 over the classes present in labels or predictions)."""
  if len(labels) == 0:
    return {"accuracy": 0.0, "macro_f1": 0.0, "examples": 0}
  f1s = []
  for c in np.union1d(preds, labels):
    tp = np.sum((preds == c) & (labels == c))
    fp, fn = np.sum((preds == c) & (labels != c)), np.sum((preds != c) & (labels == c))
    f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
  return {
    "accuracy": float(np.mean(preds == labels)),
    "macro_f1": float(np.mean(f1s)),
    "examples": int(len(labels)),
  }


def progress(total: int, initial: int, enabled: bool) -> Any:
  """A tqdm bar with ETA (a silent stand-in on other hosts)."""
  import sys

  from tqdm.auto import tqdm

  return tqdm(
    total=total,
    initial=initial,
    disable=not enabled,
    unit="step",
    dynamic_ncols=True,
    mininterval=0.1 if sys.stderr.isatty() else 5.0,
  )


class Writer:
  """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tb``."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def scalars(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    for k, v in values.items():
      self.tb.add_scalar(f"{split}/{k}", v, step)

  def records(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def save_best_adapter(
    self, params: Any, trainable: Sequence[str], meta: Mapping, logits: np.ndarray
  ) -> None:
    """Replaces ``workdir/best_adapter`` atomically: write beside it, then rename.

    Its eval logits go beside it (``best_eval_logits.npy``) so restored adapters can be
    checked against them. Every process calls this (Orbax writes sharded arrays from all of
    them); only process 0 (``enabled``) touches the files around it.
    """
    final = os.path.abspath(os.path.join(self.workdir, "best_adapter"))
    tmp, old = final + ".tmp", final + ".old"
    if self.enabled:
      tmp_logits = os.path.join(self.workdir, "best_eval_logits.tmp.npy")
      np.save(tmp_logits, logits)
      os.replace(tmp_logits, os.path.join(self.workdir, "best_eval_logits.npy"))
      shutil.rmtree(tmp, ignore_errors=True)
    _sync("best_adapter_tmp_cleared")
    lora_fn.save_adapter(
      tmp,
      params,
      trainable=trainable,
      metadata={"base_model": meta["base_model"], "class_names": meta["class_names"]},
    )
    if self.enabled:
      if os.path.exists(final):
        os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old, ignore_errors=True)
    _sync("best_adapter_renamed")

  def plot(
    self,
    path: str,
    eval_keys: Sequence[str] = ("accuracy", "macro_f1"),
    eval_ylim: tuple[float, float] | None = (0, 1),
  ) -> None:
    """Train loss and the eval metrics ``eval_keys`` against the step, as a PNG."""
    # A Figure without pyplot: no backend switch, so a notebook's inline plots keep working.
    from matplotlib.figure import Figure

    rec = self.records()
    train = [(r["step"], r["loss"]) for r in rec if r["split"] == "train" and "loss" in r]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    if train:
      s, l = zip(*sorted(dict(train).items()), strict=True)
      ax1.plot(s, l, lw=1)
    ax1.set(xlabel="step", ylabel="train loss", title="training loss")
    for key, style in zip(eval_keys, ("o-", "s--", "^:", "d-."), strict=False):
      points = sorted({r["step"]: r[key] for r in rec if r["split"] == "eval" and key in r}.items())
      if points:
        s, v = zip(*points, strict=True)
        ax2.plot(s, v, style, label=key.replace("macro_f1", "macro-F1"))
    if ax2.lines:
      ax2.legend()
    ax2.set(xlabel="step", ylabel="eval", title="evaluation")
    if eval_ylim is not None:
      ax2.set_ylim(*eval_ylim)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _sync(name: str) -> None:
  """A barrier across processes (nothing to do in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
