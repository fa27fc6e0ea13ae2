"""Checks of a ``train/run_llm.py`` config, all done before any work.

As ``validation.validate_config`` does for the ViT job (whose rules for the shared keys it
reuses): every value is read at once, touching neither devices, the network nor the data, and
one :class:`~errors.ConfigError` lists every problem as "config.KEY must be X; got: Y". A key
the job does not read is a problem too, so a typo in a notebook (where the config is not
locked) fails instead of being ignored.
"""

from __future__ import annotations

import os
from typing import Any

import llm_data
import validation as v
from errors import ConfigError

OFFLINE = "pretrain:docs"
QUANTIZE = ("", "nf4", "int4", "int8")
HINT = (
  "No hub or data here? The offline default runs anywhere: "
  "python train/run_llm.py --config configs/llm_offline.py"
)

# Every key of the job's config; None marks a value, a dict a group of keys.
_PRETRAIN = dict.fromkeys(
  (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "seq_len",
    "vocab_size",
    "steps",
    "copy_steps",
    "copy_share",
    "batch_size",
    "lr",
    "task_train",
    "task_eval",
    "error_rate",
    "max_chars",
  )
)
SCHEMA: dict[str, Any] = {
  **dict.fromkeys(
    (
      "seed",
      "workdir",
      "batch_size",
      "epochs",
      "checkpoint_every_steps",
      "keep_checkpoints",
      "log_every_steps",
      "mesh",
      "sharding",
      "export_peft",
    )
  ),
  "model": {
    **dict.fromkeys(
      ("source", "quantize", "double_quant", "compute_dtype", "scan_layers", "remat")
    ),
    "pretrain": _PRETRAIN,
  },
  "lora": dict.fromkeys(("rank", "alpha", "dropout", "rslora", "targets", "trainable")),
  "data": dict.fromkeys(("format", "train_path", "eval_path", "max_len", "packing", "workers")),
  "optim": dict.fromkeys(
    ("lr", "weight_decay", "warmup_fraction", "grad_clip", "accumulate_steps")
  ),
  "eval": dict.fromkeys(
    ("every_steps", "max_new_tokens", "generate_limit", "batch_size", "baselines")
  ),
}


def validate_config(config: Any) -> None:
  """Checks every key and value of a ``run_llm`` config; touches no device, network or data.

  Raises:
    ConfigError: one message listing every problem found, each naming its key.
  """
  problems: v.Problems = []
  _unknown_keys(config, SCHEMA, "config", problems)
  for check in (_check_run, _check_model, _check_data, _check_optim, _check_eval):
    check(config, problems)
  v._check_lora(config, problems)
  if len(problems) == 1:
    raise ConfigError(f"invalid config: {problems[0]}.")
  if problems:
    raise ConfigError(f"invalid config ({len(problems)} problems): {'; '.join(problems)}.")


def _unknown_keys(node: Any, schema: dict[str, Any], where: str, problems: v.Problems) -> None:
  if not hasattr(node, "keys"):
    return
  for key in node.keys():
    if key not in schema:
      problems.append(
        f"{where}.{key} is no key of this job; valid keys under {where}: "
        + ", ".join(sorted(schema))
      )
    elif isinstance(schema[key], dict):
      _unknown_keys(node[key], schema[key], f"{where}.{key}", problems)


def _check_run(config: Any, problems: v.Problems) -> None:
  v._require(config, problems, "seed", "an integer", v._is_int)
  for key in (
    "batch_size",
    "epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
  ):
    v._int_at_least(config, problems, key, 1)
  v._bool(config, problems, "export_peft")
  workdir = v._require(config, problems, "workdir", "a local directory path", v._is_name)
  if isinstance(workdir, str) and workdir:
    problem = "is not local" if v._is_remote(workdir) else v._workdir_problem(workdir)
    if problem:  # the offline base, the exports and the logs are plain local files
      problems.append(f"config.workdir {workdir!r} {problem}")
  mesh = v._require(config, problems, "mesh", "like 'data=-1'", lambda x: isinstance(x, str))
  if isinstance(mesh, str):
    shards = v._mesh_axes(mesh, problems)
    rows, batch = shards.get("data", 1) * shards.get("fsdp", 1), v._get(config, "batch_size")
    if v._is_int(batch) and batch >= 1 and batch % rows:
      problems.append(
        f"config.batch_size {batch} must divide evenly over the mesh's data x fsdp = {rows} "
        f"batch shards (config.mesh={mesh!r})"
      )
  v._require(config, problems, "sharding", f"one of {v.SHARDINGS}", lambda x: x in v.SHARDINGS)


def _check_model(config: Any, problems: v.Problems) -> None:
  source = v._require(
    config,
    problems,
    "model.source",
    f"{OFFLINE!r}, a Hugging Face hub id (org/name) or a local checkpoint directory",
    v._is_name,
  )
  v._require(config, problems, "model.quantize", f"one of {QUANTIZE}", lambda x: x in QUANTIZE)
  v._require(config, problems, "model.compute_dtype", f"one of {v.DTYPES}", lambda x: x in v.DTYPES)
  for key in ("model.double_quant", "model.scan_layers", "model.remat"):
    v._bool(config, problems, key)
  has_pretrain = v._get(config, "model.pretrain") is not v._MISSING
  if source == OFFLINE:
    _check_pretrain(config, problems)
  elif isinstance(source, str) and source:
    if has_pretrain:
      problems.append(f"config.model.pretrain is only read with model.source {OFFLINE!r}")
    if not os.path.isdir(source) and (os.path.exists(source) or not v._REPO_ID.match(source)):
      problems.append(
        f"config.model.source {source!r} must be {OFFLINE!r}, a checkpoint directory or a hub "
        "id (org/name)"
      )


def _check_pretrain(config: Any, problems: v.Problems) -> None:
  if v._get(config, "model.pretrain") is v._MISSING:
    problems.append(f"config.model.pretrain is missing (the sizes of the {OFFLINE!r} base)")
    return
  for key in _PRETRAIN:
    if key not in ("lr", "error_rate", "copy_share", "copy_steps"):
      v._int_at_least(config, problems, f"model.pretrain.{key}", 1)
  v._int_at_least(config, problems, "model.pretrain.copy_steps", 0)
  v._require(
    config,
    problems,
    "model.pretrain.copy_share",
    "in [0, 1]",
    lambda x: v._is_number(x) and 0 <= x <= 1,
  )
  v._require(
    config, problems, "model.pretrain.lr", "a number > 0", lambda x: v._is_number(x) and x > 0
  )
  v._require(
    config,
    problems,
    "model.pretrain.error_rate",
    "in (0, 1]",
    lambda x: v._is_number(x) and 0 < x <= 1,
  )
  get = lambda k: v._get(config, f"model.pretrain.{k}")
  steps, copy_steps = get("steps"), get("copy_steps")
  if all(v._is_int(x) for x in (steps, copy_steps)) and copy_steps >= steps:
    problems.append(
      f"config.model.pretrain.copy_steps ({copy_steps}) must be under steps ({steps}): the "
      "steps after them pre-train on text"
    )
  hidden, heads, kv, vocab = (
    get("hidden_size"),
    get("num_heads"),
    get("num_kv_heads"),
    get("vocab_size"),
  )
  if all(v._is_int(x) and x >= 1 for x in (hidden, heads, kv)):
    if hidden % heads or (hidden // heads) % 2:
      problems.append(
        f"config.model.pretrain.hidden_size ({hidden}) must be num_heads ({heads}) times an "
        "even head size"
      )
    if heads % kv:
      problems.append(f"config.model.pretrain.num_kv_heads ({kv}) must divide num_heads ({heads})")
  if v._is_int(vocab) and vocab < 260:
    problems.append(
      f"config.model.pretrain.vocab_size must be >= 260 (256 bytes and 4 special tokens); "
      f"got: {vocab}"
    )


def _check_data(config: Any, problems: v.Problems) -> None:
  v._require(
    config, problems, "data.format", f"one of {llm_data.FORMATS}", lambda x: x in llm_data.FORMATS
  )
  offline = v._get(config, "model.source") == OFFLINE
  for key in ("data.train_path", "data.eval_path"):
    rule = "a JSONL file ('' for the offline task)" if offline else "a JSONL file"
    path = v._require(
      config, problems, key, rule, lambda x: isinstance(x, str) and (offline or bool(x))
    )
    if isinstance(path, str) and path and not os.path.isfile(path):
      problems.append(f"config.{key} {path!r} is not a file. {HINT}")
  v._int_at_least(config, problems, "data.max_len", 8)
  v._int_at_least(config, problems, "data.workers", 0)
  v._bool(config, problems, "data.packing")


def _check_optim(config: Any, problems: v.Problems) -> None:
  v._check_optim(config, problems)
  v._int_at_least(config, problems, "optim.accumulate_steps", 1)


def _check_eval(config: Any, problems: v.Problems) -> None:
  for key, low in (
    ("eval.every_steps", 0),
    ("eval.max_new_tokens", 0),
    ("eval.generate_limit", 0),
    ("eval.batch_size", 1),
  ):
    v._int_at_least(config, problems, key, low)
  v._bool(config, problems, "eval.baselines")
