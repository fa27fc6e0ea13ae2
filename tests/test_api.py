"""The public names: a change here is a change of the API."""

import lorax_fn


def test_public_names():
  assert sorted(lorax_fn.__all__) == [
    "AdaLoraState",
    "AdapterPool",
    "Layout",
    "LoraLeaf",
    "LoraOptState",
    "LoraStack",
    "MaterializeWarning",
    "QuantLeaf",
    "ShardingWarning",
    "adalora",
    "adalora_ranks",
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
    "loraplus",
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


# Types, predicates and warnings, documented by their attributes: no example of their own.
_NO_EXAMPLE = {
  "Layout",
  "LoraLeaf",
  "LoraOptState",
  "LoraStack",
  "MaterializeWarning",
  "QuantLeaf",
  "ShardingWarning",
  "is_lora",
  "is_quant",
  "is_stack",
}


def test_every_public_function_has_a_doctested_example():
  # The doctests run with pytest --doctest-modules (testpaths include lorax_fn and train).
  for name in sorted(set(lorax_fn.__all__) - _NO_EXAMPLE):
    doc = getattr(lorax_fn, name).__doc__
    assert "\n  Example:\n" in doc and ">>> " in doc, name
