"""``save_adapter`` / ``restore_adapter``: adapters only, exact, and refusing a wrong model."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, randomize

import lorax_fn as lora_fn

K = jax.random.key


def _params(rank=2, targets=("query", "value"), **kw):
  base = {
    "enc": {
      n: {"kernel": jax.random.normal(K(i), (11, 13))}
      for i, n in enumerate(("query", "key", "value"))
    },
    "head": {"kernel": jax.random.normal(K(5), (13, 7)), "bias": jnp.zeros(7)},
  }
  return randomize(lora_fn.wrap(base, rank=rank, targets=targets, key=K(9), **kw), K(3))


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_round_trip_is_exact_and_small(tmp_path):
  p = _params()
  path = tmp_path / "adapter"
  lora_fn.save_adapter(path, p, trainable=("head",), metadata={"base_model": "toy/v1"})
  fresh = lora_fn.wrap(lora_fn.unwrap(p), rank=2, targets=("query", "value"), key=K(0))
  restored = lora_fn.restore_adapter(
    path, fresh, trainable=("head",), metadata={"base_model": "toy/v1"}
  )
  assert_trees_equal(restored, p)
  arrays, _ = lora_fn._checkpoint.adapter_state(p, trainable=("head",))
  raw = sum(np.asarray(x).nbytes for x in arrays.values())
  base_bytes = 3 * 11 * 13 * 4
  assert _dir_bytes(path) <= 1.1 * raw + 64 * 1024 < base_bytes + raw + 64 * 1024
  config = lora_fn.read_adapter_config(path)
  assert config["lora"]["enc/query/kernel"]["rank"] == 2
  assert config["trainable"] == ["head/bias", "head/kernel"]
  assert config["metadata"] == {"base_model": "toy/v1"}


def test_existing_directory_is_not_overwritten(tmp_path):
  lora_fn.save_adapter(tmp_path / "a", _params())
  with pytest.raises(ValueError, match="already exists"):
    lora_fn.save_adapter(tmp_path / "a", _params())


@pytest.mark.parametrize(
  "model, kwargs, regex",
  [
    (
      dict(rank=3),
      {},
      r"LoRA leaf 'enc/query/kernel' was saved with rank=2 but the model has "
      r"rank=3",
    ),
    (dict(alpha=4.0), {}, r"saved with alpha=2.0 but the model has alpha=4.0"),
    (
      dict(targets=("query", "key")),
      {},
      r"holds LoRA leaves \['enc/query/kernel', "
      r"'enc/value/kernel'\] but the model has",
    ),
    (
      {},
      dict(trainable=("head",)),
      r"holds fully trained leaves \[\] but the model trains "
      r"\['head/bias', 'head/kernel'\]",
    ),
    (
      {},
      dict(metadata={"base_model": "other"}),
      r"has metadata base_model='toy/v1'; expected "
      r"'other'",
    ),
  ],
)
def test_restore_into_a_different_model_is_an_error(tmp_path, model, kwargs, regex):
  lora_fn.save_adapter(tmp_path / "a", _params(), metadata={"base_model": "toy/v1"})
  with pytest.raises(ValueError, match=regex):
    lora_fn.restore_adapter(tmp_path / "a", _params(**model), **kwargs)


def test_extra_leaf_shape_mismatch_is_an_error(tmp_path):
  p = _params()
  lora_fn.save_adapter(tmp_path / "a", p, trainable=("head",))
  other = dict(p, head={"kernel": jnp.zeros((13, 5)), "bias": jnp.zeros(5)})
  with pytest.raises(
    ValueError,
    match=r"'head/bias' was saved with shape and dtype \[\[7\], "
    r"'float32'\] but the model has \[\[5\], 'float32'\]",
  ):
    lora_fn.restore_adapter(tmp_path / "a", other, trainable=("head",))


def test_restored_arrays_are_jax_arrays(tmp_path):
  p = _params()
  lora_fn.save_adapter(tmp_path / "a", p)
  restored = lora_fn.restore_adapter(tmp_path / "a", p)
  assert isinstance(restored["enc"]["query"]["kernel"].a, jax.Array)


def _largest_file(root):
  files = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


def _flip(path, n=16):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  mid = len(data) // 2
  for i in range(mid, mid + n):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _big_params():
  base = {"enc": {"query": {"kernel": jax.random.normal(K(0), (96, 128))}}}
  return randomize(lora_fn.wrap(base, rank=16, targets=("query",), key=K(1)), K(2))


# Orbax leaves half-finished async readers behind when TensorStore fails to read a damaged
# file; they raise while being collected. Collect them inside the test that made them.
_ORBAX_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_LEFTOVERS
def test_flipped_bytes_in_the_array_data_are_caught_by_checksums(tmp_path):
  p = _big_params()
  lora_fn.save_adapter(tmp_path / "a", p)
  assert set(lora_fn.read_adapter_config(tmp_path / "a")["checksums"]) == {
    "enc/query/kernel/a",
    "enc/query/kernel/b",
  }
  # Orbax reads these bytes back without an error, with changed values.
  _flip(_largest_file(tmp_path / "a" / "adapter"))
  with pytest.raises(
    ValueError,
    match=r"adapter checkpoint '.*' is damaged: the array 'enc/query/kernel/[ab]' read back "
    r"differs from the one saved \(checksum sha256:",
  ):
    lora_fn.restore_adapter(tmp_path / "a", p)
  gc.collect()


@_ORBAX_LEFTOVERS
@pytest.mark.parametrize(
  "damage, where, regex",
  [
    (_truncate, "adapter", r"is damaged: its arrays in '.*adapter' cannot be read"),
    (_truncate, "config", r"is damaged: its record '.*config' cannot be read \(JSONDecodeError"),
    (_flip, "config", r"is damaged: its record '.*config' cannot be read"),
  ],
)
def test_damaged_files_name_the_checkpoint_and_the_part(tmp_path, damage, where, regex):
  p = _big_params()
  lora_fn.save_adapter(tmp_path / "a", p)
  damage(_largest_file(tmp_path / "a" / where))
  with pytest.raises(ValueError, match=regex):
    lora_fn.restore_adapter(tmp_path / "a", p)
  gc.collect()


def test_a_directory_that_is_not_an_adapter_checkpoint_is_named(tmp_path):
  p = _params()
  with pytest.raises(FileNotFoundError, match=r"adapter checkpoint '.*nowhere' does not exist"):
    lora_fn.restore_adapter(tmp_path / "nowhere", p)
  for step in ("3", "6"):  # a training run's CheckpointManager directory
    os.makedirs(tmp_path / "ckpts" / step / "state")
  with pytest.raises(
    ValueError,
    match=r"is not an adapter checkpoint written by lorax_fn.save_adapter.*found: \['3', '6'\]"
    r".*looks like a training checkpoint directory",
  ):
    lora_fn.restore_adapter(tmp_path / "ckpts", p)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"found: a file"):
    lora_fn.read_adapter_config(tmp_path / "file")


SAVE_ERRORS = [
  (
    "metadata_not_mapping",
    dict(metadata="toy-model"),
    TypeError,
    r"metadata must be a mapping of str keys to JSON values; got: 'toy-model'",
  ),
  ("metadata_int_key", dict(metadata={1: "x"}), TypeError, r"metadata keys must be str; got: 1"),
  (
    "metadata_numpy_value",
    dict(metadata={"lr": np.float32(1e-3)}),
    TypeError,
    r"metadata\['lr'\] must be JSON-serialisable; got: .*0.001.* of type float32",
  ),
  (
    "metadata_nan",
    dict(metadata={"loss": float("nan")}),
    TypeError,
    r"metadata\['loss'\] must be JSON-serialisable",
  ),
]


@pytest.mark.parametrize("name, kwargs, exc, regex", SAVE_ERRORS, ids=[e[0] for e in SAVE_ERRORS])
def test_save_errors(tmp_path, name, kwargs, exc, regex):
  with pytest.raises(exc, match=regex):
    lora_fn.save_adapter(tmp_path / "a", _params(), **kwargs)
  assert not os.listdir(tmp_path), "nothing is written before the checks pass"


def test_paths_orbax_would_store_under_one_name_are_refused(tmp_path):
  base = {
    "layer.0": {"query": {"kernel": jnp.ones((5, 7))}},
    "layer": {"0.query": {"kernel": jnp.ones((5, 7))}},
  }
  p = lora_fn.wrap(base, rank=2, targets=("query", "0.query"), key=K(0))
  with pytest.raises(
    ValueError,
    match=r"the paths 'layer/0.query/kernel/a' and 'layer.0/query/kernel/a' would be stored "
    r"under one Orbax name 'layer.0.query.kernel.a'",
  ):
    lora_fn.save_adapter(tmp_path / "a", p)


def test_a_file_in_the_path_and_home_relative_paths(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"'.*file' is a file, not a directory"):
    lora_fn.save_adapter(tmp_path / "file" / "adapter", _params())
  monkeypatch.setenv("HOME", str(tmp_path))
  lora_fn.save_adapter("~/adapter", _params())
  assert (tmp_path / "adapter" / "config").is_dir()
  assert lora_fn.read_adapter_config("~/adapter")["lora"]
  with pytest.raises(TypeError, match=r"metadata must be a mapping"):
    lora_fn.restore_adapter("~/adapter", _params(), metadata="toy")
