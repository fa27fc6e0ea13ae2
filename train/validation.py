"""Checks of a ``train/run.py`` config, all done before any work.

``validate_config`` reads every value at once, touching neither devices, the network nor the
data, and raises one :class:`~errors.ConfigError` that lists every problem as "config.KEY must
be X; got: Y". ``validate_data`` does the checks that need the loaded data, and
``user_errors`` turns the library's ``ValueError`` s raised while a run is set up (a target
that matches nothing, a mesh that does not fit the devices, a resume with another rank) into
``ConfigError`` s too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from errors import ConfigError, HubUnreachable

import lorax_fn as lora_fn

DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "model")
SHARDINGS = ("fsdp", "replicate")
LOCAL_MODELS = ("pretrain:digits", "random")
# "org/name" or "name": what the hub accepts as a repo id (what hf_vit.py fetches).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MISSING = object()

Problems = list[str]


def validate_config(config: Any) -> None:
  """Checks every value of a run config; touches no device, network or data.

  Args:
    config: a ``ConfigDict`` as ``configs/*.py`` build it, overrides applied.

  Raises:
    ConfigError: one message listing every problem found, each naming its key.
  """
  problems: Problems = []
  for check in (_check_run, _check_model, _check_lora, _check_data, _check_optim, _check_devices):
    check(config, problems)
  if len(problems) == 1:
    raise ConfigError(f"invalid config: {problems[0]}.")
  if problems:
    raise ConfigError(f"invalid config ({len(problems)} problems): {'; '.join(problems)}.")


def validate_data(
  config: Any, train_size: int, eval_size: int, num_classes: int, num_processes: int = 1
) -> None:
  """Checks the config against the loaded data (still before any training).

  Args:
    config: the run config.
    train_size: examples in the training split.
    eval_size: examples in the evaluation split.
    num_classes: classes of the data.
    num_processes: processes that split the data and each batch between them.

  Raises:
    ConfigError: a batch larger than the data, an empty eval split, fewer than two classes.
  """
  if num_classes < 2:
    plural = "" if num_classes == 1 else "es"
    raise ConfigError(f"the data has {num_classes} class{plural}; a classifier needs at least 2.")
  if eval_size == 0:
    raise ConfigError(f"the eval split {config.data.get('eval_split', '')!r} has no examples.")
  # Each process reads its own shard of the data into its own rows of every batch.
  if (train_size // num_processes) < config.batch_size // num_processes:
    raise ConfigError(
      f"config.batch_size {config.batch_size} is larger than the {train_size:,} training "
      "examples: an epoch would have no step. Use a batch size of at most the data's size."
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Re-raises the ``ValueError`` s (and missing files, an unreachable hub) as ``ConfigError``.

  Used around the set-up of a run only: there the library's ``ValueError`` s are mistakes in
  the config (its documented convention), while in the training loop they would be bugs and
  keep their traceback.
  """
  try:
    yield
  except ConfigError:
    raise
  except (FileNotFoundError, HubUnreachable) as e:
    raise ConfigError(str(e)) from e
  except ValueError as e:
    if not _raised_by_us(e):  # JAX's, numpy's...: a bug to see with its traceback
      raise
    raise ConfigError(str(e)) from e


# ValueErrors raised in these directories (the library, the job) are about the user's input.
_OURS = (
  os.path.dirname(os.path.abspath(lora_fn.__file__)),
  os.path.dirname(os.path.abspath(__file__)),
)


def _raised_by_us(e: BaseException) -> bool:
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  where = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else ""
  return any(where.startswith(d + os.sep) for d in _OURS)


# ------------------------------------------------------------------------------------------
# Helpers: each appends "config.KEY must be RULE; got: VALUE" when the value breaks its rule
# ------------------------------------------------------------------------------------------


def _get(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _require(
  config: Any, problems: Problems, key: str, rule: str, ok: Callable[[Any], bool]
) -> Any:
  """The value at ``key``, after recording a problem if it is missing or ``ok`` rejects it."""
  value = _get(config, key)
  if value is _MISSING:
    problems.append(f"config.{key} is missing")
  elif not ok(value):
    problems.append(f"config.{key} must be {rule}; got: {value!r}")
  return value


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_name(x: Any) -> bool:
  return isinstance(x, str) and bool(x)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _int_at_least(config: Any, problems: Problems, key: str, low: int) -> Any:
  return _require(config, problems, key, f"an integer >= {low}", lambda x: _is_int(x) and x >= low)


def _bool(config: Any, problems: Problems, key: str) -> Any:
  return _require(config, problems, key, "True or False", lambda x: isinstance(x, bool))


def _is_remote(path: str) -> bool:
  return "://" in path


def _names(config: Any, problems: Problems, key: str, *, non_empty: bool) -> None:
  """A tuple of names (``lora.targets``, ``lora.trainable``): path components, not regexes."""
  rule = "a non-empty tuple of names" if non_empty else "a tuple of names"
  _require(
    config,
    problems,
    key,
    rule,
    lambda x: (
      isinstance(x, (tuple, list))
      and (len(x) > 0 or not non_empty)
      and all(isinstance(n, str) and n for n in x)
    ),
  )


def _classes(config: Any, problems: Problems, key: str) -> tuple[int, ...] | None:
  """A digits class list: at least two distinct integers in 0..9."""
  value = _require(
    config,
    problems,
    key,
    "at least 2 distinct digits from 0..9, e.g. (5, 6, 7)",
    lambda x: (
      isinstance(x, (tuple, list))
      and len(x) >= 2
      and len(set(x)) == len(x)
      and all(_is_int(c) and 0 <= c <= 9 for c in x)
    ),
  )
  ok = isinstance(value, (tuple, list)) and all(_is_int(c) and 0 <= c <= 9 for c in value)
  return tuple(value) if ok else None


# ------------------------------------------------------------------------------------------
# The checks, one group of keys each
# ------------------------------------------------------------------------------------------


def _check_run(config: Any, problems: Problems) -> None:
  _require(config, problems, "seed", "an integer", _is_int)
  for key in (
    "batch_size",
    "epochs",
    "eval_every_epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
  ):
    _int_at_least(config, problems, key, 1)
  for key in ("export_merged", "export_peft", "export_hf", "compare_baselines"):
    _bool(config, problems, key)
  workdir = _require(config, problems, "workdir", "a directory path", _is_name)
  if isinstance(workdir, str) and workdir and not _is_remote(workdir):
    problem = _workdir_problem(workdir)
    if problem:
      problems.append(f"config.workdir {workdir!r} {problem}")
  # PEFT and transformers read local directories: the exports are written with plain files.
  for key in ("export_peft", "export_hf"):
    if _get(config, key) is True and isinstance(workdir, str) and _is_remote(workdir):
      problems.append(
        f"config.{key} writes a local directory under config.workdir, so config.workdir must "
        f"be a local path; got: {workdir!r}"
      )


def _workdir_problem(workdir: str) -> str | None:
  """Why ``workdir`` cannot be used as a local directory (``None`` if it can)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      return "exists and is not a directory"
    return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"cannot be created: {parent!r} is not a directory"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot be created: {parent!r} is not writable"
  return None


def _check_model(config: Any, problems: Problems) -> None:
  source = _require(
    config,
    problems,
    "model.source",
    f"one of {LOCAL_MODELS}, a Hugging Face hub id or a local checkpoint path",
    _is_name,
  )
  _require(config, problems, "model.compute_dtype", f"one of {DTYPES}", lambda x: x in DTYPES)
  for key in ("model.scan_layers", "model.remat"):
    _bool(config, problems, key)
  if not isinstance(source, str) or not source:
    return
  if source in LOCAL_MODELS:
    for key in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
      _int_at_least(config, problems, f"model.preset.{key}", 1)
    hidden, heads = _get(config, "model.preset.hidden_size"), _get(config, "model.preset.num_heads")
    if _is_int(hidden) and _is_int(heads) and heads >= 1 and hidden % heads:
      problems.append(
        f"config.model.preset.hidden_size ({hidden}) must be divisible by num_heads ({heads})"
      )
  if source == "pretrain:digits":
    _int_at_least(config, problems, "model.pretrain_epochs", 1)
    _classes(config, problems, "model.pretrain_classes")
  elif source not in LOCAL_MODELS and not _is_remote(source):
    if not os.path.exists(source) and not _REPO_ID.match(source):
      problems.append(
        f"config.model.source {source!r} is neither an existing file or directory nor a "
        f"Hugging Face hub id (org/name), nor one of {LOCAL_MODELS}"
      )
    elif os.path.isfile(source) and not source.endswith(".safetensors"):
      problems.append(f"config.model.source {source!r} must be a directory or .safetensors file")


def _check_lora(config: Any, problems: Problems) -> None:
  _int_at_least(config, problems, "lora.rank", 1)
  _require(
    config,
    problems,
    "lora.alpha",
    "a finite number > 0",
    lambda x: _is_number(x) and math.isfinite(x) and x > 0,
  )
  _require(config, problems, "lora.dropout", "in [0, 1)", lambda x: _is_number(x) and 0 <= x < 1)
  _bool(config, problems, "lora.rslora")
  _names(config, problems, "lora.targets", non_empty=True)
  _names(config, problems, "lora.trainable", non_empty=False)


def _check_data(config: Any, problems: Problems) -> None:
  name = _require(config, problems, "data.name", "a dataset name", _is_name)
  path = _require(config, problems, "data.path", "a path or ''", lambda x: isinstance(x, str))
  if name == "digits":
    _check_digits(config, problems, path)
  elif isinstance(path, str) and path and not _is_remote(path) and not os.path.exists(path):
    problems.append(f"config.data.path {path!r} does not exist")
  if name != "digits":
    for key in ("data.train_split", "data.eval_split"):
      _require(config, problems, key, "a split name", _is_name)
  _int_at_least(config, problems, "data.workers", 0)
  _int_at_least(config, problems, "data.eval_limit", 0)
  _bool(config, problems, "data.flip")
  _require(
    config,
    problems,
    "data.crop_scale",
    "a pair (lo, hi) with 0 < lo <= hi <= 1",
    lambda x: (
      isinstance(x, (tuple, list))
      and len(x) == 2
      and all(_is_number(v) for v in x)
      and 0 < x[0] <= x[1] <= 1
    ),
  )
  size = _int_at_least(config, problems, "data.image_size", 1)
  patch = _patch_size(config)
  if _is_int(size) and size >= 1 and patch and size % patch:
    problems.append(
      f"config.data.image_size must be divisible by the model's patch size {patch}; got: {size}"
    )


def _check_digits(config: Any, problems: Problems, path: Any) -> None:
  if path:
    problems.append(
      f"config.data.path must be '' for the digits data (bundled with scikit-learn, it reads "
      f"no files); got: {path!r}"
    )
  classes = _classes(config, problems, "data.classes")
  size = _get(config, "data.image_size")
  if _is_int(size) and 1 <= size < 8:
    problems.append(f"config.data.image_size must be >= 8 for the 8x8 digits; got: {size}")
  if _get(config, "model.source") != "pretrain:digits" or classes is None:
    return
  pretrain = _get(config, "model.pretrain_classes")
  if isinstance(pretrain, (tuple, list)):
    shared = sorted(set(classes) & set(pretrain))
    if shared:
      problems.append(
        f"config.data.classes must be disjoint from model.pretrain_classes {tuple(pretrain)} "
        f"(new digits for the pre-trained base); both hold {shared}"
      )


def _patch_size(config: Any) -> int | None:
  """The model's patch size, where it is known without a download."""
  source = _get(config, "model.source")
  if source in LOCAL_MODELS:
    patch = _get(config, "model.preset.patch_size")
    return patch if _is_int(patch) and patch >= 1 else None
  if not isinstance(source, str) or _is_remote(source):
    return None
  directory = source if os.path.isdir(source) else os.path.dirname(source)
  try:
    with open(os.path.join(directory, "config.json")) as f:
      patch = json.load(f).get("patch_size")
  except (OSError, ValueError):  # no readable config.json here: the loader will say so
    return None
  return patch if _is_int(patch) and patch >= 1 else None


def _check_optim(config: Any, problems: Problems) -> None:
  finite = lambda x: _is_number(x) and math.isfinite(x)
  _require(config, problems, "optim.lr", "a finite number > 0", lambda x: finite(x) and x > 0)
  _require(
    config, problems, "optim.weight_decay", "a finite number >= 0", lambda x: finite(x) and x >= 0
  )
  _require(
    config, problems, "optim.warmup_fraction", "in [0, 1)", lambda x: finite(x) and 0 <= x < 1
  )
  _require(config, problems, "optim.grad_clip", "a number > 0", lambda x: _is_number(x) and x > 0)


def _check_devices(config: Any, problems: Problems) -> None:
  mesh = _require(config, problems, "mesh", "like 'data=-1'", lambda x: isinstance(x, str))
  if isinstance(mesh, str):
    axes = _mesh_axes(mesh, problems)
    batch = _get(config, "batch_size")
    shards = axes.get("data", 1) * axes.get("fsdp", 1)
    if axes and shards > 0 and _is_int(batch) and batch >= 1 and batch % shards:
      problems.append(
        f"config.batch_size {batch} must divide evenly over the mesh's data x fsdp = {shards} "
        f"batch shards (config.mesh={mesh!r})"
      )
  _require(config, problems, "sharding", f"one of {SHARDINGS}", lambda x: x in SHARDINGS)
  _int_at_least(config, problems, "shard_min_size", 0)
  _check_dist(config, problems)


def _mesh_axes(mesh: str, problems: Problems) -> dict[str, int]:
  """Axis sizes of a mesh spec (``-1``: the remaining devices); ``{}`` after a problem."""
  rule = f"like 'data=2,fsdp=4': distinct axes from {MESH_AXES}, sizes >= 1 or one -1"
  axes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in mesh.split(","))):
    name, eq, size = (s.strip() for s in part.partition("="))
    ok = eq and name in MESH_AXES and name not in axes and re.fullmatch(r"-1|[1-9]\d*", size)
    if not ok:
      problems.append(f"config.mesh must be {rule}; got: {mesh!r}")
      return {}
    axes[name] = int(size)
  if not axes or list(axes.values()).count(-1) > 1:
    problems.append(f"config.mesh must be {rule}; got: {mesh!r}")
    return {}
  return {n: s for n, s in axes.items() if s != -1}


def _is_host_port(address: str) -> bool:
  match = re.fullmatch(r"[^\s:]+:(\d{1,5})", address)
  return bool(match) and 0 < int(match.group(1)) < 65536


def _check_dist(config: Any, problems: Problems) -> None:
  coordinator = _require(
    config,
    problems,
    "dist.coordinator",
    "'' or 'host:port'",
    lambda x: isinstance(x, str) and (x == "" or _is_host_port(x)),
  )
  count = _int_at_least(config, problems, "dist.num_processes", 0)
  pid = _int_at_least(config, problems, "dist.process_id", -1)
  if coordinator == "" and ((_is_int(count) and count) or (_is_int(pid) and pid >= 0)):
    problems.append(
      "config.dist.num_processes and dist.process_id are only read with dist.coordinator "
      f"set; got: num_processes={count!r}, process_id={pid!r} without a coordinator"
    )
  if _is_int(count) and count >= 1 and _is_int(pid) and pid >= count:
    problems.append(f"config.dist.process_id must be < dist.num_processes ({count}); got: {pid}")
