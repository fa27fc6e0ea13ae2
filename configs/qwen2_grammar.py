"""QLoRA of Qwen2-1.5B-Instruct to correct grammar: the seed's recipe.

    python train/run_llm.py --config configs/qwen2_grammar.py \\
        --config.data.train_path=grammar/train.jsonl --config.data.eval_path=grammar/eval.jsonl
    python train/run_llm.py --config configs/qwen2_grammar.py --config.model.source=/models/qwen2

r=16, alpha=32 on q/k/v/o, dropout 0.05, lr 2e-4, 3 epochs, batch 4 with gradient accumulation
4 (``optax.MultiSteps``), an NF4 base with double quantisation, bf16 compute. The data are
JSONL instruction pairs in the seed's format, one per line:
``{"instruction": "Correct the grammar.", "input": "she go home", "output": "She goes home."}``.
The checkpoint ``Qwen/Qwen2-1.5B-Instruct`` is fetched when the hub is reachable;
``--config.model.source`` points at a local copy instead. Without either, the run stops with
exit status 2 and names the offline default, ``configs/llm_offline.py``.
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = "runs/qwen2_grammar"

  config.model = ml_collections.ConfigDict()
  config.model.source = "Qwen/Qwen2-1.5B-Instruct"  # a hub id or a local checkpoint directory
  config.model.quantize = "nf4"  # the base's linear kernels: "nf4", "int4", "int8" or ""
  config.model.double_quant = True  # quantise the NF4 block scales too (QLoRA's DQ)
  config.model.compute_dtype = "bfloat16"
  config.model.scan_layers = False
  config.model.remat = True

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 16
  config.lora.alpha = 32.0
  config.lora.dropout = 0.05
  config.lora.rslora = False
  config.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
  config.lora.trainable = ()  # modules trained fully besides the adapters (none)

  config.data = ml_collections.ConfigDict()
  config.data.format = "instruction"  # "instruction", "chat" or "text" JSONL
  config.data.train_path = "data/grammar/train.jsonl"
  config.data.eval_path = "data/grammar/eval.jsonl"
  config.data.max_len = 512
  config.data.packing = True  # several examples per row (kept apart in attention)
  config.data.workers = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4
  config.optim.weight_decay = 0.0
  config.optim.warmup_fraction = 0.03
  config.optim.grad_clip = 1.0
  config.optim.accumulate_steps = 4  # optax.MultiSteps: an update every 4 micro-batches

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 200  # held-out loss; 0: at the end only
  config.eval.max_new_tokens = 0  # 0: the longest held-out response + 8
  config.eval.generate_limit = 200  # greedy generations scored at the end (0: all)
  config.eval.batch_size = 16
  config.eval.baselines = True  # also score the base prompted alone and copying the input

  config.mesh = "data=-1"
  config.sharding = "fsdp"
  config.batch_size = 4  # rows per micro-batch
  config.epochs = 3
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.log_every_steps = 10
  config.export_peft = True  # workdir/peft: peft.PeftModel.from_pretrained loads it
  return config
