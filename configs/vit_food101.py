"""LoRA fine-tuning of ViT-B/16 (ImageNet-21k) on Food-101, the PEFT image-classification recipe.

    python train/run.py --config configs/vit_food101.py
    python train/run.py --config configs/vit_food101.py:all_linear   # LoRA on every linear kernel
    python train/run.py --config configs/vit_food101.py --config.data.path=/data/food101 \\
        --config.lora.rank=8 --config.batch_size=64

The hub dataset ``ethz/food101`` and checkpoint ``google/vit-base-patch16-224-in21k`` are
fetched when the hub is reachable; ``--config.data.path`` and ``--config.model.source`` point
at local copies instead.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = "runs/vit_food101"

  config.model = ml_collections.ConfigDict()
  # A hub id, a local directory or .safetensors file; "random" starts from a randomly
  # initialised ViT of the ``preset`` shape (smoke tests only).
  config.model.source = "google/vit-base-patch16-224-in21k"
  config.model.preset = ml_collections.ConfigDict(
    dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
  )
  config.model.scan_layers = False
  config.model.remat = False
  config.model.compute_dtype = "float32"  # "bfloat16" for bf16 compute

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 16
  config.lora.alpha = 16.0
  config.lora.dropout = 0.1
  config.lora.rslora = False
  # PEFT's tutorial: query and value; ":all_linear" adapts every linear kernel.
  config.lora.targets = ("query", "value")
  if arg == "all_linear":
    config.lora.targets = ("query", "key", "value", "out", "mlp_in", "mlp_out")
  config.lora.trainable = ("head",)  # trained fully (PEFT's modules_to_save)

  config.data = ml_collections.ConfigDict()
  config.data.name = "ethz/food101"
  config.data.path = ""  # local imagefolder or parquet copy; empty: the hub
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 224
  config.data.crop_scale = (0.35, 1.0)
  config.data.flip = True
  config.data.workers = 2  # decoding processes; 0 decodes in the main process
  config.data.eval_limit = 0  # evaluate on the first N eval images only (0: all)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 5e-3
  config.optim.weight_decay = 0.01
  config.optim.warmup_fraction = 0.1
  config.optim.grad_clip = 1.0

  # Devices: a mesh over data / fsdp / model ("data=-1": data parallel over every device;
  # "data=2,fsdp=4": batch over 8, weights split 4 ways), and how weights are split:
  # "fsdp" (largest axis over fsdp, next over model) or "replicate".
  config.mesh = "data=-1"
  config.sharding = "fsdp"
  config.shard_min_size = 1 << 14  # smaller leaves are replicated
  # Multi-process runs: jax.distributed.initialize() is called when the coordinator is set
  # here, or when the environment names one (JAX_COORDINATOR_ADDRESS, a TPU pod slice,
  # SLURM or Open MPI with several tasks).
  config.dist = ml_collections.ConfigDict()
  config.dist.coordinator = ""  # "host:port" of process 0
  config.dist.num_processes = 0
  config.dist.process_id = -1

  config.batch_size = 64  # global: split over processes and the mesh's data/fsdp axes
  config.epochs = 5
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.log_every_steps = 10
  config.export_merged = False  # workdir/merged: the merged parameters (Orbax)
  # workdir/peft: the best adapter + head as a PEFT directory (peft.PeftModel.from_pretrained);
  # workdir/merged_hf: the best model merged, for transformers' from_pretrained.
  config.export_peft = False
  config.export_hf = False
  config.compare_baselines = False  # also train full fine-tuning and a linear probe
  return config
