"""The offline default: LoRA on real handwritten digits, no network, a few minutes on a CPU.

A small ViT is pre-trained on digits 0-4 (scikit-learn's bundled digits), then adapted with
LoRA to the unseen digits 5-9 with a fresh head; the run ends comparing LoRA against full
fine-tuning and a linear probe (head only) trained with the same budget.

    python train/run.py --config configs/digits.py
    python train/run.py --config configs/digits.py --config.lora.rank=2 --config.epochs=4
"""

from __future__ import annotations

import os
import runpy

import ml_collections

# The Food-101 config is the base; loaded by path, as --config loads this file.
_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_food101.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = _BASE["get_config"](arg)
  config.workdir = "runs/digits"
  config.model.source = "pretrain:digits"  # pre-train the base here on digits 0-4
  config.model.preset.update(
    dict(patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)
  )
  config.model.pretrain_epochs = 12
  config.model.pretrain_classes = (0, 1, 2, 3, 4)
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.lora.dropout = 0.0
  config.lora.targets = ("query", "value", "mlp_in", "mlp_out")
  config.data.name = "digits"
  config.data.classes = (5, 6, 7, 8, 9)
  config.data.image_size = 16
  config.data.crop_scale = (0.85, 1.0)
  config.data.flip = False
  config.data.workers = 0
  config.optim.lr = 3e-3
  config.optim.warmup_fraction = 0.05
  config.batch_size = 32
  config.epochs = 8
  config.checkpoint_every_steps = 50
  config.log_every_steps = 5
  config.compare_baselines = True
  return config
