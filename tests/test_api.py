"""The public names: a change here is a change of the API."""

import lorax_fn


def test_public_names():
  assert sorted(lorax_fn.__all__) == [
    "AdapterPool",
    "Layout",
    "LoraLeaf",
    "LoraOptState",
    "LoraStack",
    "MaterializeWarning",
    "QuantLeaf",
    "ShardingWarning",
    "adapter_config",
    "batch_sharding",
    "check_adapter_config",
    "combine",
    "default_layout",
    "from_bnb_4bit",
    "infer_layouts",
    "is_lora",
    "is_quant",
    "is_stack",
    "load_peft",
    "lora",
    "make_mesh",
    "merge",
    "optimizer",
    "partition_specs",
    "quantize",
    "quantize_pieces",
    "read_adapter_config",
    "restore_adapter",
    "save_adapter",
    "save_peft",
    "scale_adapter",
    "serving_problems",
    "set_adapter",
    "set_strength",
    "shard",
    "split",
    "stack_adapters",
    "state_shardings",
    "summary",
    "trainable_mask",
    "unstack_adapter",
    "unwrap",
    "weighted_adapter",
    "wrap",
  ]
  for name in lorax_fn.__all__:
    assert getattr(lorax_fn, name).__doc__, name
