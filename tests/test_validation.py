"""``train/validation.py``: every config value checked before any work, one message per run."""

from __future__ import annotations

import math
import os
import runpy
import sys

import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
)
import validation
from errors import ConfigError, HubUnreachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name="vit_food101", arg=None, **overrides):
  config = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"](arg)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.parametrize(("name", "arg"), [("vit_food101", None), ("vit_food101", "all_linear")])
def test_shipped_configs_are_valid(name, arg):
  validation.validate_config(_config(name, arg))
  validation.validate_config(_config("digits"))
  validation.validate_config(_config(model__source="random"))


FOOD, DIGITS = "vit_food101", "digits"
BAD = [
  # (config, overrides, message regex after 'invalid config: config.')
  (FOOD, dict(batch_size=0), r"batch_size must be an integer >= 1; got: 0"),
  (FOOD, dict(epochs=0), r"epochs must be an integer >= 1; got: 0"),
  (FOOD, dict(checkpoint_every_steps=0), r"checkpoint_every_steps must be an integer >= 1"),
  (FOOD, dict(log_every_steps=-5), r"log_every_steps must be an integer >= 1; got: -5"),
  (FOOD, dict(eval_every_epochs=0), r"eval_every_epochs must be an integer >= 1"),
  (FOOD, dict(keep_checkpoints=0), r"keep_checkpoints must be an integer >= 1; got: 0"),
  (FOOD, dict(optim__lr=-0.003), r"optim\.lr must be a finite number > 0; got: -0\.003"),
  (FOOD, dict(optim__lr=0.0), r"optim\.lr must be a finite number > 0; got: 0\.0"),
  (FOOD, dict(optim__lr=math.inf), r"optim\.lr must be a finite number > 0; got: inf"),
  (FOOD, dict(optim__lr=math.nan), r"optim\.lr must be a finite number > 0; got: nan"),
  (FOOD, dict(optim__weight_decay=-0.1), r"optim\.weight_decay must be a finite number >= 0; got"),
  (FOOD, dict(optim__warmup_fraction=1.0), r"optim\.warmup_fraction must be in \[0, 1\)"),
  (FOOD, dict(optim__warmup_fraction=-0.1), r"optim\.warmup_fraction must be in \[0, 1\)"),
  (FOOD, dict(optim__grad_clip=0.0), r"optim\.grad_clip must be a number > 0; got: 0\.0"),
  (FOOD, dict(lora__rank=0), r"lora\.rank must be an integer >= 1; got: 0"),
  (FOOD, dict(lora__alpha=-16.0), r"lora\.alpha must be a finite number > 0; got: -16\.0"),
  (FOOD, dict(lora__alpha=math.nan), r"lora\.alpha must be a finite number > 0; got: nan"),
  (FOOD, dict(lora__alpha=math.inf), r"lora\.alpha must be a finite number > 0; got: inf"),
  (FOOD, dict(lora__dropout=1.0), r"lora\.dropout must be in \[0, 1\); got: 1\.0"),
  (FOOD, dict(lora__targets=()), r"lora\.targets must be a non-empty tuple of names"),
  (FOOD, dict(lora__targets=("query", "")), r"lora\.targets must be a non-empty tuple"),
  (FOOD, dict(model__compute_dtype="float64"), r"model\.compute_dtype must be one of"),
  (
    FOOD,
    dict(model__compute_dtype="bf16"),
    r"model\.compute_dtype must be one of \('float32', 'bfloa",
  ),
  (FOOD, dict(data__image_size=0), r"data\.image_size must be an integer >= 1; got: 0"),
  (
    FOOD,
    dict(model__source="random", data__image_size=100),
    r"data\.image_size must be divisible by",
  ),
  (
    FOOD,
    dict(model__source="random", model__preset__hidden_size=30, model__preset__num_heads=4),
    r"model\.preset\.hidden_size \(30\) must be divisible by num_heads \(4\)",
  ),
  (
    FOOD,
    dict(model__preset__patch_size=0, model__source="random"),
    r"model\.preset\.patch_size must be an int",
  ),
  (FOOD, dict(data__crop_scale=(0.0, 1.0)), r"data\.crop_scale must be a pair \(lo, hi\)"),
  (
    FOOD,
    dict(data__crop_scale=(0.9, 0.5)),
    r"data\.crop_scale must be a pair .*got: \(0\.9, 0\.5\)",
  ),
  (
    FOOD,
    dict(data__crop_scale=(0.5, 1.5)),
    r"data\.crop_scale must be a pair .*got: \(0\.5, 1\.5\)",
  ),
  (FOOD, dict(data__workers=-1), r"data\.workers must be an integer >= 0; got: -1"),
  (FOOD, dict(data__eval_limit=-1), r"data\.eval_limit must be an integer >= 0; got: -1"),
  (FOOD, dict(data__path="/nonexistent/food"), r"data\.path '/nonexistent/food' does not"),
  (FOOD, dict(data__train_split=""), r"data\.train_split must be a split name"),
  (FOOD, dict(model__source="/nonexistent/vit"), r"model\.source '/nonexistent/vit' is neither"),
  (FOOD, dict(model__source="./vit dir"), r"model\.source './vit dir' is neither an existing"),
  (FOOD, dict(mesh="data=2,pipe=2"), r"mesh must be like 'data=2,fsdp=4'.*'data=2,pipe"),
  (FOOD, dict(mesh="data=0"), r"mesh must be like .*got: 'data=0'"),
  (FOOD, dict(mesh="data=-1,fsdp=-1"), r"mesh must be like .*one -1"),
  (FOOD, dict(mesh="data=2,data=2"), r"mesh must be like .*distinct axes"),
  (FOOD, dict(mesh="data=3"), r"batch_size 64 must divide evenly over the mesh's data x fsdp = 3"),
  (FOOD, dict(sharding="zero3"), r"sharding must be one of \('fsdp', 'replicate'\)"),
  (FOOD, dict(shard_min_size=-1), r"shard_min_size must be an integer >= 0"),
  (FOOD, dict(dist__coordinator="localhost"), r"dist\.coordinator must be '' or 'host:p"),
  (FOOD, dict(dist__coordinator="h:99999"), r"dist\.coordinator must be '' or 'host:port"),
  (
    FOOD,
    dict(dist__num_processes=2),
    r"dist\.num_processes and dist\.process_id are only read with",
  ),
  (
    FOOD,
    dict(dist__coordinator="127.0.0.1:1234", dist__num_processes=2, dist__process_id=2),
    r"dist\.process_id must be < dist\.num_processes \(2\); got: 2",
  ),
  (DIGITS, dict(data__path="/nonexistent"), r"data\.path must be '' for the digits data"),
  (DIGITS, dict(data__classes=(5,)), r"data\.classes must be at least 2 distinct digits"),
  (DIGITS, dict(data__classes=(5, 5, 6)), r"data\.classes must be at least 2 distinct"),
  (DIGITS, dict(data__classes=(5, 10)), r"data\.classes must be .*got: \(5, 10\)"),
  (
    DIGITS,
    dict(data__classes=(4, 5, 6)),
    r"data\.classes must be disjoint from model\.pretrain_classes .* both hold \[4\]",
  ),
  (DIGITS, dict(model__pretrain_classes=(1,)), r"model\.pretrain_classes must be at least"),
  (DIGITS, dict(model__pretrain_epochs=0), r"model\.pretrain_epochs must be an integer"),
  (DIGITS, dict(data__image_size=4), r"data\.image_size must be >= 8 for the 8x8 digits"),
]


@pytest.mark.parametrize(
  ("name", "overrides", "match"),
  BAD,
  ids=[f"{n}:{','.join(f'{k}={v!r}' for k, v in o.items())}" for n, o, _ in BAD],
)
def test_bad_value_is_a_config_error(name, overrides, match):
  with pytest.raises(ConfigError, match=r"^invalid config: config\." + match):
    validation.validate_config(_config(name, **overrides))


def test_workdir_that_is_a_file_or_under_one(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=r"config\.workdir '.*/file' exists and is not a dir"):
    validation.validate_config(_config(workdir=str(tmp_path / "file")))
  with pytest.raises(ConfigError, match=r"config\.workdir .* cannot be created: '.*/file' is not"):
    validation.validate_config(_config(workdir=str(tmp_path / "file" / "run")))
  validation.validate_config(_config(workdir=str(tmp_path / "new" / "run")))
  validation.validate_config(_config(workdir="gs://bucket/run"))  # remote: not checked here


def test_model_source_that_is_a_local_file_or_directory(tmp_path):
  (tmp_path / "weights.bin").write_text("")
  with pytest.raises(ConfigError, match=r"must be a directory or \.safetensors file"):
    validation.validate_config(_config(model__source=str(tmp_path / "weights.bin")))
  (tmp_path / "config.json").write_text('{"patch_size": 16}')
  validation.validate_config(_config(model__source=str(tmp_path)))
  with pytest.raises(ConfigError, match=r"divisible by the model's patch size 16; got: 200"):
    validation.validate_config(_config(model__source=str(tmp_path), data__image_size=200))


def test_every_problem_is_listed_in_one_message():
  config = _config(batch_size=0, optim__lr=-1.0, lora__rank=0)
  with pytest.raises(ConfigError, match=r"^invalid config \(3 problems\): ") as info:
    validation.validate_config(config)
  message = str(info.value)
  assert "\n" not in message
  for key in ("config.batch_size", "config.optim.lr", "config.lora.rank"):
    assert key in message


@pytest.mark.parametrize(
  ("sizes", "match"),
  [
    ((100, 10, 1), r"the data has 1 class; a classifier needs at least 2"),
    ((100, 0, 5), r"the eval split 'validation' has no examples"),
    ((1347, 10, 5), r"config\.batch_size 100000 is larger than the 1,347 training examples"),
  ],
)
def test_data_that_does_not_fit_the_config(sizes, match):
  with pytest.raises(ConfigError, match=match):
    validation.validate_data(_config(batch_size=100000), *sizes)


def test_user_errors_turns_value_errors_into_config_errors():
  import jax
  import jax.numpy as jnp
  import numpy as np

  import lorax_fn as lora_fn

  w = {"k": jnp.ones((5, 7))}
  r2 = lora_fn.adapter_config(lora_fn.wrap(w, rank=2, targets=("k",), key=jax.random.key(0)))
  r3 = lora_fn.adapter_config(lora_fn.wrap(w, rank=3, targets=("k",), key=jax.random.key(0)))
  with pytest.raises(ConfigError, match="rank=3") as info:
    with validation.user_errors():
      lora_fn.check_adapter_config(r2, r3)  # the library's ValueError: a user mistake
  assert isinstance(info.value.__cause__, ValueError)
  with pytest.raises(ValueError, match="cannot reshape") as info:
    with validation.user_errors():
      np.zeros(6).reshape(4, 4)  # numpy's (or JAX's) ValueError: a bug, with its traceback
  assert not isinstance(info.value, ConfigError)
  with pytest.raises(ConfigError, match="hub"):
    with validation.user_errors():
      raise HubUnreachable("the hub is unreachable")
  with pytest.raises(TypeError):  # not the user's: keeps its type (and traceback)
    with validation.user_errors():
      raise TypeError("a bug")
