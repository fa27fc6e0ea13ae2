"""Bad input across the public API: one table of (call, exception, message), never silent.

Each row is a plausible user mistake; the message must name the parameter (and the path
where there is one), what was expected and what came. Module-specific tables live beside
their module's tests (test_wrap, test_partition, test_checkpoint, test_shard); this one
covers the mistakes that cross modules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lorax_fn as lora_fn

K = jax.random.key


def _base():
  return {
    "dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)},
    "head": {"kernel": jnp.ones((7, 3)), "bias": jnp.zeros(3)},
    "step": 3,
  }


def _wrapped(rank=2, **kw):
  return lora_fn.wrap(_base(), rank=rank, targets=("dense",), key=K(0), **kw)


def _trainable():
  return lora_fn.split(_wrapped())[0]


def _leaf(**changes):
  leaf = _wrapped()["dense"]["kernel"]
  return dataclasses.replace(leaf, **changes)


def _apply(p, x):
  return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def _tx():
  return lora_fn.optimizer(optax.sgd(0.1), _wrapped())


CASES = [
  # wrap
  (
    "wrap_empty_regex",
    lambda: lora_fn.wrap(_base(), targets="", key=K(0)),
    ValueError,
    r"targets must not be an empty regex \(it would match every path\)",
  ),
  (
    "wrap_kernel_names_str",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=K(0), kernel_names="kernel"),
    TypeError,
    r"kernel_names must be a sequence of leaf names; got: 'kernel'",
  ),
  (
    "wrap_layout_none",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=K(0), layouts={"dense": None}),
    ValueError,
    r"layouts\[.dense.\] must give one of .* per kernel axis; got: None",
  ),
  (
    "wrap_kernel_names_miss",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=K(0), kernel_names=("weight",)),
    ValueError,
    r"targets \('dense',\) matched no parameter; the leaves under 'dense' are named "
    r"\['bias', 'kernel'\], none of them in kernel_names=\('weight',\)",
  ),
  (
    "wrap_name_is_a_path",
    lambda: lora_fn.wrap(_base(), targets=("dense/kernel",), key=K(0)),
    ValueError,
    r"names match single path components: for the path itself pass the regex "
    r"string 'dense/kernel'",
  ),
  (
    "wrap_callable_one_arg",
    lambda: lora_fn.wrap(_base(), targets=lambda p: True, key=K(0)),
    TypeError,
    r"targets as a callable must accept \(path, leaf\)",
  ),
  (
    "wrap_int_key",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=0),
    TypeError,
    r"key must be one PRNG key, e.g. jax.random.key\(0\); got: 0",
  ),
  (
    "wrap_two_keys",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=jax.random.split(K(0))),
    TypeError,
    r"key must be one PRNG key.*shape \(2,\)",
  ),
  (
    "wrap_dtype_name",
    lambda: lora_fn.wrap(_base(), targets=("dense",), key=K(0), dtype="foo"),
    TypeError,
    r"dtype of the factors must be a float dtype; got: 'foo'",
  ),
  (
    "wrap_twice",
    lambda: lora_fn.wrap(_wrapped(), targets=("dense",), key=K(0)),
    ValueError,
    r"the leaf at 'dense/kernel' is already a LoRA leaf",
  ),
  # lora
  (
    "lora_not_callable",
    lambda: lora_fn.lora("model.apply"),
    TypeError,
    r"fn must be callable, e.g. model.apply; got: 'model.apply'",
  ),
  (
    "lora_int_factor",
    lambda: lora_fn.lora(_apply)(
      {
        **_wrapped(),
        "dense": {"kernel": _leaf(a=jnp.ones((2, 5), jnp.int32)), "bias": jnp.zeros(7)},
      },
      jnp.ones((3, 5)),
    ),
    TypeError,
    r"LoRA leaf at 'arg 0/dense/kernel': a must be a float array; got dtype int32",
  ),
  (
    "lora_list_factor",
    lambda: lora_fn.lora(_apply)(
      {**_wrapped(), "dense": {"kernel": _leaf(a=[[1.0] * 5] * 2), "bias": jnp.zeros(7)}},
      jnp.ones((3, 5)),
    ),
    TypeError,
    r"LoRA leaf at 'arg 0/dense/kernel': a must be an array; got: list",
  ),
  (
    "lora_int_dropout_key",
    lambda: lora_fn.lora(_apply)(_wrapped(), jnp.ones((3, 5)), dropout_key=0),
    TypeError,
    r"dropout_key must be one PRNG key",
  ),
  (
    "lora_trainable_half",
    lambda: lora_fn.lora(_apply)(_trainable(), jnp.ones((3, 5))),
    ValueError,
    r"LoRA leaf at 'arg 0/dense/kernel' has no w \(None\)",
  ),
  # merge / unwrap
  (
    "merge_unwrapped",
    lambda: lora_fn.merge(_base()),
    ValueError,
    r"merge: params hold no LoRA or quantised leaf",
  ),
  (
    "merge_dtype_name",
    lambda: lora_fn.merge(_wrapped(), dtype="foo"),
    TypeError,
    r"merge dtype \(None: each base's\) must be a float dtype; got: 'foo'",
  ),
  (
    "merge_dtype_array",
    lambda: lora_fn.merge(_wrapped(), dtype=jnp.ones(3)),
    TypeError,
    r"merge dtype \(None: each base's\) must be a float dtype; got an array of shape \(3,\)",
  ),
  (
    "unwrap_unwrapped",
    lambda: lora_fn.unwrap(_base()),
    ValueError,
    r"unwrap: params hold no LoRA leaf",
  ),
  (
    "unwrap_trainable_half",
    lambda: lora_fn.unwrap(_trainable()),
    ValueError,
    r"unwrap: the LoRA leaf at 'dense/kernel' has no base w \(None\)",
  ),
  # split / trainable / combine
  (
    "trainable_empty_regex",
    lambda: lora_fn.split(_wrapped(), trainable=""),
    ValueError,
    r"trainable must not be an empty regex",
  ),
  (
    "trainable_wrong_type",
    lambda: lora_fn.split(_wrapped(), trainable={"head"}),
    TypeError,
    r"trainable must be a sequence of names, a regex",
  ),
  (
    "trainable_path_as_name",
    lambda: lora_fn.split(_wrapped(), trainable=("head/kernel",)),
    ValueError,
    r"trainable 'head/kernel' matched no parameter \(names match single path "
    r"components",
  ),
  (
    "trainable_only_lora",
    lambda: lora_fn.split(
      lora_fn.wrap(
        {"q": {"kernel": jnp.ones((5, 7))}, "head": {"kernel": jnp.ones((7, 3))}},
        rank=2,
        targets=("q",),
        key=K(0),
      ),
      trainable=("head", "q"),
    ),
    ValueError,
    r"trainable 'q' matched no parameter \(it selects only LoRA kernels",
  ),
  (
    "trainable_one_arg_callable",
    lambda: lora_fn.split(_wrapped(), trainable=lambda p: True),
    TypeError,
    r"trainable as a callable must accept \(path, leaf\)",
  ),
  (
    "allow_empty_str",
    lambda: lora_fn.trainable_mask(_wrapped(), allow_empty="no"),
    TypeError,
    r"allow_empty must be a bool; got: 'no'",
  ),
  (
    "combine_two_full_trees",
    lambda: lora_fn.combine(_wrapped(), _wrapped()),
    ValueError,
    r"combine: more than one tree holds a value at 'dense/bias'",
  ),
  (
    "combine_missing_subtree",
    lambda: lora_fn.combine(_trainable(), {"dense": None}),
    ValueError,
    r"combine: tree 1 does not have the structure of tree 0 \(only in tree 0: \['dense/bias'",
  ),
  # optimizer
  (
    "opt_init_unwrapped",
    lambda: _tx().init(_base()),
    ValueError,
    r"params at 'dense/kernel' must be a LoRA leaf, as in the params given to "
    r"lorax_fn.optimizer; got: ArrayImpl",
  ),
  (
    "opt_update_other_rank",
    lambda: _tx().update(_wrapped(rank=3), _tx().init(_wrapped())),
    ValueError,
    r"updates at 'dense/kernel' has rank 3 and layout \('in', 'out'\); the optimizer "
    r"was built for rank 2",
  ),
  (
    "opt_update_missing",
    lambda: _tx().update({"dense": _wrapped()["dense"]}, _tx().init(_wrapped())),
    ValueError,
    r"updates must have the structure of the params given to lorax_fn.optimizer; missing: "
    r"\['head/bias', 'head/kernel', 'step'\]",
  ),
  (
    "opt_foreign_state",
    lambda: _tx().update(_wrapped(), optax.sgd(0.1).init(_wrapped())),
    TypeError,
    r"state must be the LoraOptState that this optimizer's init returned; got: ",
  ),
  (
    "opt_split_without_head",
    lambda: lora_fn.optimizer(optax.sgd(0.1), _wrapped(), trainable=("head",)).update(
      lora_fn.split(_wrapped())[0],
      lora_fn.optimizer(optax.sgd(0.1), _wrapped(), trainable=("head",)).init(_wrapped()),
    ),
    ValueError,
    r"updates at 'head/bias' is None, but the optimizer trains that leaf: give split\(\) the "
    r"same trainable=",
  ),
  (
    "opt_split_with_extra_head",
    lambda: _tx().update(lora_fn.split(_wrapped(), trainable=("head",))[0], _tx().init(_wrapped())),
    ValueError,
    r"updates at 'head/bias' has a gradient, but the optimizer does not train that leaf",
  ),
  (
    "lora_fn_with_dropout_key",
    lambda: lora_fn.lora(lambda p, x, dropout_key=None: x),
    TypeError,
    r"fn has a parameter named dropout_key, which the transformed function takes",
  ),
  # summary / checkpoints of half trees
  (
    "summary_unwrapped",
    lambda: lora_fn.summary(_base()),
    ValueError,
    r"params hold no LoRA leaf and no trainable leaf",
  ),
  (
    "summary_trainable_half",
    lambda: lora_fn.summary(_trainable()),
    ValueError,
    r"LoRA leaf at 'dense/kernel' has no w \(None\)",
  ),
  (
    "adapter_config_trainable_half",
    lambda: lora_fn.adapter_config(_trainable()),
    ValueError,
    r"LoRA leaf at 'dense/kernel' has no w \(None\)",
  ),
  (
    "check_config_missing_keys",
    lambda: lora_fn.check_adapter_config(
      {"format": "lorax_fn.adapter/1"}, lora_fn.adapter_config(_wrapped())
    ),
    ValueError,
    r"the saved adapter: the adapter record's 'lora' must be a dict; got: None \(keys: "
    r"\['format'\]\)",
  ),
  (
    "check_config_not_a_mapping",
    lambda: lora_fn.check_adapter_config("{}", lora_fn.adapter_config(_wrapped())),
    ValueError,
    r"an adapter record must be a mapping from lorax_fn.adapter_config or read_adapter_config; "
    r"got: str",
  ),
  (
    "check_config_leaf_keys",
    lambda: lora_fn.check_adapter_config(
      {**lora_fn.adapter_config(_wrapped()), "lora": {"dense/kernel": {"rank": 2}}},
      lora_fn.adapter_config(_wrapped()),
    ),
    ValueError,
    r"the record of LoRA leaf 'dense/kernel' must have keys",
  ),
  # quantize
  (
    "quantize_bias",
    lambda: lora_fn.quantize(_base(), "nf4", targets=("bias",)),
    ValueError,
    r"the targeted leaf at 'dense/bias' must have at least 2 axes \(a kernel\); got shape \(7,\)",
  ),
  (
    "quantize_double_quant_str",
    lambda: lora_fn.quantize(_base(), "nf4", targets=("dense",), double_quant="no"),
    TypeError,
    r"double_quant must be a bool; got: 'no'",
  ),
  (
    "quantize_block_size_bool",
    lambda: lora_fn.quantize(_base(), "nf4", targets=("dense",), block_size=True),
    ValueError,
    r"block_size \(a power of two\) must be a positive int",
  ),
  (
    "quantize_kind",
    lambda: lora_fn.quantize(_base(), "NF4", targets=("dense",)),
    ValueError,
    r"kind must be one of \('nf4', 'int4', 'int8'\); got: 'NF4'",
  ),
  (
    "quantize_pieces_kind",
    lambda: lora_fn.quantize_pieces([np.ones(8)], "fp4", shape=(2, 4), dtype=np.float32),
    ValueError,
    r"kind must be one of \('nf4', 'int4', 'int8'\); got: 'fp4'",
  ),
  (
    "quantize_pieces_block_size",
    lambda: lora_fn.quantize_pieces(
      [np.ones(8)], "nf4", shape=(2, 4), dtype=np.float32, block_size=48
    ),
    ValueError,
    r"block_size must be a positive power of two; got: 48",
  ),
  (
    "quantize_pieces_transposed_vector",
    lambda: lora_fn.quantize_pieces(
      [np.ones(8)], "nf4", shape=(8,), dtype=np.float32, transposed=True
    ),
    ValueError,
    r"transposed needs a shape of at least 2 axes; got: \(8,\)",
  ),
  (
    "quantize_pieces_transposed_str",
    lambda: lora_fn.quantize_pieces(
      [np.ones(8)], "nf4", shape=(2, 4), dtype=np.float32, transposed="yes"
    ),
    TypeError,
    r"transposed must be a bool; got: 'yes'",
  ),
  (
    "quantize_pieces_count",
    lambda: lora_fn.quantize_pieces([np.ones(7)], "nf4", shape=(2, 4), dtype=np.float32),
    ValueError,
    r"the pieces hold 7 elements; shape \(2, 4\) has 8",
  ),
  # infer_layouts / default_layout
  (
    "infer_no_matrix",
    lambda: lora_fn.infer_layouts(lambda p, x: x * p["b"], {"b": jnp.ones(3)}, jnp.ones(3)),
    ValueError,
    r"infer_layouts: params hold no array of 2\+ axes",
  ),
  (
    "infer_unused_params",
    lambda: lora_fn.infer_layouts(lambda p, x: x @ x.T, _base(), jnp.ones((3, 5))),
    ValueError,
    r"fn used no parameter of 2\+ axes in a matmul",
  ),
  (
    "infer_not_callable",
    lambda: lora_fn.infer_layouts("apply", _base()),
    TypeError,
    r"fn must be callable",
  ),
  (
    "default_layout_1d",
    lambda: lora_fn.default_layout("dense/bias", (7,)),
    ValueError,
    r"LoRA needs a kernel of at least 2 axes; 'dense/bias' has shape \(7,\)",
  ),
  (
    "default_layout_int_shape",
    lambda: lora_fn.default_layout("dense/kernel", 7),
    TypeError,
    r"shape must be a tuple of ints; got: 7",
  ),
  (
    "default_layout_tuple_path",
    lambda: lora_fn.default_layout(("dense", "kernel"), (5, 7)),
    TypeError,
    r"path must be a '/'-joined str",
  ),
  # meshes and shardings
  (
    "mesh_pair_not_in_list",
    lambda: lora_fn.make_mesh(("data", 1)),
    TypeError,
    r"mesh axes must be a string like 'data=2,fsdp=4'",
  ),
  (
    "mesh_bool_size",
    lambda: lora_fn.make_mesh({"data": True}),
    ValueError,
    r"mesh axis sizes must be positive integers or -1",
  ),
  (
    "mesh_no_devices",
    lambda: lora_fn.make_mesh("data=-1", devices=[]),
    ValueError,
    r"devices must not be empty",
  ),
  (
    "specs_mesh_string",
    lambda: lora_fn.partition_specs(_wrapped(), mesh="data=1"),
    TypeError,
    r"mesh must be a jax.sharding.Mesh \(or AbstractMesh\)",
  ),
  (
    "specs_single_pair",
    lambda: lora_fn.partition_specs(
      _wrapped(), ("dense/kernel", P()), mesh=lora_fn.make_mesh("data=-1")
    ),
    TypeError,
    r"rules must be a list of \(regex, spec\) pairs; got the single pair",
  ),
  (
    "specs_min_size",
    lambda: lora_fn.partition_specs(_wrapped(), mesh=lora_fn.make_mesh("data=-1"), min_size="big"),
    ValueError,
    r"min_size must be a non-negative int; got: 'big'",
  ),
  (
    "batch_no_data_axis",
    lambda: lora_fn.batch_sharding(lora_fn.make_mesh("model=-1")),
    ValueError,
    r"the mesh has no 'data' or 'fsdp' axis \(axes: \('model',\)\)",
  ),
  # LoraLeaf built by hand
  (
    "leaf_roles",
    lambda: _leaf(roles=("in", "foo")),
    ValueError,
    r"LoraLeaf roles must be a tuple of \('in', 'out', 'stack'\), one per axis; got: ",
  ),
  ("leaf_rank", lambda: _leaf(rank=0), ValueError, r"LoraLeaf rank must be a positive int"),
  (
    "leaf_alpha",
    lambda: _leaf(alpha=float("nan")),
    ValueError,
    r"LoraLeaf alpha must be a positive finite number; got: nan",
  ),
  ("leaf_dropout", lambda: _leaf(dropout=1.5), ValueError, r"LoraLeaf dropout must be in"),
]


@pytest.mark.parametrize("name, call, exc, regex", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(name, call, exc, regex):
  with pytest.raises(exc, match=regex):
    call()


def test_numpy_and_jax_scalars_are_valid_settings():
  p = lora_fn.wrap(
    _base(),
    rank=np.int64(2),
    alpha=jnp.float32(4.0),
    dropout=np.float32(0.1),
    targets=("dense",),
    key=K(0),
  )
  leaf = p["dense"]["kernel"]
  assert (leaf.rank, leaf.alpha, leaf.dropout) == (2, 4.0, pytest.approx(0.1))
  q = lora_fn.quantize(_base(), "nf4", targets=("dense",), block_size=np.int64(32))
  assert q["dense"]["kernel"].block_size == 32


def test_a_trainable_regex_selects_every_leaf_it_finds():
  # Like names (PEFT's modules_to_save), a regex trains a whole module, bias included.
  mask = lora_fn.trainable_mask(_wrapped(), trainable="head")
  assert (mask["head"]["kernel"], mask["head"]["bias"], mask["dense"]["bias"]) == (
    True,
    True,
    False,
  )


def test_the_optimizer_accepts_the_trainable_half():
  trainable = lora_fn.split(_wrapped())[0]
  tx = lora_fn.optimizer(optax.sgd(0.1), trainable)
  updates, _ = tx.update(trainable, tx.init(trainable))
  assert updates["dense"]["kernel"].a.shape == (2, 5)


def test_raw_keys_of_the_default_prng_are_valid():
  leaf = lora_fn.wrap(_base(), rank=2, targets=("dense",), key=jax.random.PRNGKey(0))
  out = lora_fn.lora(_apply)(leaf, jnp.ones((3, 5)), dropout_key=jax.random.PRNGKey(1))
  assert out.shape == (3, 7)
