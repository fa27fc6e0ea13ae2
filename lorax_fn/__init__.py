"""lorax_fn: LoRA as a pure function transform for JAX and Flax."""

from lorax_fn._adalora import AdaLoraState, adalora, adalora_ranks
from lorax_fn._bnb import from_bnb_4bit
from lorax_fn._checkpoint import adapter_config, save_adapter
from lorax_fn._infer import infer_layouts
from lorax_fn._interpret import MaterializeWarning
from lorax_fn._leaves import Layout, LoraLeaf, LoraStack, is_lora, is_stack
from lorax_fn._loraplus import loraplus
from lorax_fn._mesh import batch_sharding, make_mesh
from lorax_fn._mix import weighted_adapter
from lorax_fn._optim import LoraOptState, optimizer
from lorax_fn._partition import combine, split, trainable_mask
from lorax_fn._peft import save_peft
from lorax_fn._peft_load import load_peft
from lorax_fn._pool import AdapterPool
from lorax_fn._quant import is_quant, quantize, quantize_pieces
from lorax_fn._quant_leaf import QuantLeaf
from lorax_fn._restore import check_adapter_config, read_adapter_config, restore_adapter
from lorax_fn._serving import serving_problems
from lorax_fn._shard import ShardingWarning, partition_specs, shard, state_shardings
from lorax_fn._stack import (
  scale_adapter,
  set_adapter,
  set_strength,
  stack_adapters,
  unstack_adapter,
)
from lorax_fn._summary import summary
from lorax_fn._transform import lora
from lorax_fn._wrap import default_layout, merge, unwrap, wrap

__all__ = [
  "AdaLoraState",
  "adalora",
  "adalora_ranks",
  "weighted_adapter",
  "AdapterPool",
  "unstack_adapter",
  "stack_adapters",
  "set_strength",
  "set_adapter",
  "scale_adapter",
  "is_stack",
  "LoraStack",
  "Layout",
  "LoraLeaf",
  "MaterializeWarning",
  "LoraOptState",
  "adapter_config",
  "batch_sharding",
  "check_adapter_config",
  "combine",
  "default_layout",
  "infer_layouts",
  "is_lora",
  "load_peft",
  "lora",
  "loraplus",
  "make_mesh",
  "merge",
  "optimizer",
  "partition_specs",
  "QuantLeaf",
  "is_quant",
  "quantize",
  "quantize_pieces",
  "from_bnb_4bit",
  "read_adapter_config",
  "restore_adapter",
  "save_adapter",
  "save_peft",
  "serving_problems",
  "shard",
  "ShardingWarning",
  "split",
  "state_shardings",
  "summary",
  "trainable_mask",
  "unwrap",
  "wrap",
]
