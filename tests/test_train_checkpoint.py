"""``train/checkpoint.py``: train state keyed by tree path, checksums, damaged steps moved aside."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
)
import checkpoint as checkpoint_lib

import lorax_fn as lora_fn


class Moments(NamedTuple):
  count: jax.Array
  mu: jax.Array
  nu: jax.Array


class Reordered(NamedTuple):  # the same fields, another order (as an optax upgrade might)
  nu: jax.Array
  count: jax.Array
  mu: jax.Array


def _state(seed=0):
  """A LoRA train state as ``train/run.py`` builds it: split trainables + optimizer state."""
  params = {"dense": {"kernel": jnp.ones((7, 5)), "bias": jnp.zeros(5)}, "head": jnp.ones((5, 3))}
  params = lora_fn.wrap(params, rank=2, targets=("dense",), key=jax.random.key(seed))
  tx = lora_fn.optimizer(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), params, trainable=("head",)
  )
  trainable, _ = lora_fn.split(params, trainable=("head",))
  state = {"trainable": trainable, "opt_state": tx.init(trainable)}
  # Distinct values everywhere (Adam's mu and nu too), so a swap cannot pass unnoticed.
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)) for x in leaves]
  return jax.tree.unflatten(treedef, leaves)


def _assert_trees_equal(a, b):
  fa, fb = checkpoint_lib.leaf_paths(a), checkpoint_lib.leaf_paths(b)
  assert [n for n, _ in fa] == [n for n, _ in fb]
  for (names, x), (_, y) in zip(fa, fb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg="/".join(names))


def _save(directory, steps, state_of=_state, keep=5):
  ckpts = checkpoint_lib.Checkpoints(str(directory), keep=keep)
  for step in steps:
    ckpts.save(step, state_of(step), {"step": step})
  ckpts.wait_until_finished()
  ckpts.close()


def _restore(directory, like, messages=None):
  ckpts = checkpoint_lib.Checkpoints(str(directory), keep=5)
  log = (messages if messages is not None else []).append
  try:
    return ckpts.restore_latest(like, check_meta=lambda meta: None, log=log)
  finally:
    ckpts.close()


def test_state_is_saved_keyed_by_tree_path_with_checksums(tmp_path):
  _save(tmp_path, [3])
  arrays = checkpoint_lib.flatten(ocp.StandardCheckpointer().restore(tmp_path / "3" / "state"))
  names = sorted("/".join(p) for p in arrays)
  assert "opt_state/inner/1/0/mu/head" in names and "opt_state/inner/1/0/nu/head" in names
  assert "trainable/dense/kernel/a" in names and "opt_state/inner/1/0/count" in names
  meta = json.loads((tmp_path / "3" / "meta" / "metadata").read_text())
  assert meta["state_format"] == "tree_path" and sorted(meta["arrays"]) == names
  assert meta["arrays"]["trainable/head"]["shape"] == [5, 3]
  assert meta["arrays"]["trainable/head"]["dtype"] == "float32"


def test_restores_bit_identical(tmp_path):
  _save(tmp_path, [3, 5])
  step, state, meta = _restore(tmp_path, _state(99))
  assert step == 5 and meta["step"] == 5
  _assert_trees_equal(state, _state(5))


def test_reordered_state_restores_by_name(tmp_path):
  """By position, a state whose fields come in another order would swap mu and nu."""
  saved = {"adam": Moments(jnp.int32(4), jnp.full((5,), 1.0), jnp.full((5,), 2.0))}
  _save(tmp_path, [1], state_of=lambda _: saved)
  like = {"adam": Reordered(jnp.zeros((5,)), jnp.int32(0), jnp.zeros((5,)))}
  _, state, _ = _restore(tmp_path, like)
  assert isinstance(state["adam"], Reordered)
  np.testing.assert_array_equal(state["adam"].mu, saved["adam"].mu)
  np.testing.assert_array_equal(state["adam"].nu, saved["adam"].nu)
  assert int(state["adam"].count) == 4


@pytest.mark.parametrize(
  ("like", "match"),
  [
    (
      {"adam": {"mu": jnp.zeros(5), "nu": jnp.zeros(5), "velocity": jnp.zeros(5)}},
      r"missing adam/velocity; not in this run adam/count",
    ),
    (
      {"adam": {"count": jnp.int32(0), "mu": jnp.zeros(6), "nu": jnp.zeros(5)}},
      r"checkpoint array adam/mu is float32\[5\]; this run's is float32\[6\]",
    ),
  ],
  ids=["renamed_field", "other_shape"],
)
def test_state_that_does_not_fit_names_the_path(tmp_path, like, match):
  saved = {"adam": Moments(jnp.int32(4), jnp.ones((5,)), jnp.ones((5,)))}
  _save(tmp_path, [1], state_of=lambda _: saved)
  with pytest.raises(ValueError, match=match):
    _restore(tmp_path, like)


def test_restores_a_checkpoint_of_the_positional_format(tmp_path):
  """Written exactly as ``train/run.py`` wrote checkpoints before they were keyed by path."""
  state = _state(7)
  flat = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}
  mngr = ocp.CheckpointManager(
    str(tmp_path),
    options=ocp.CheckpointManagerOptions(max_to_keep=2),
    item_names=("state", "meta"),
  )
  meta = {"step": 6, "best_accuracy": 0.5}
  mngr.save(
    6, args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
  )
  mngr.wait_until_finished()
  mngr.close()
  step, restored, saved = _restore(tmp_path, _state(0))
  assert step == 6 and saved["best_accuracy"] == 0.5
  _assert_trees_equal(restored, state)


def _largest_file(step_dir):
  """The largest of the state's data files (TensorStore's OCDBT ``d/`` files: the arrays)."""
  files = glob.glob(f"{step_dir}/state/**/d/*", recursive=True)
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):  # a disk that filled up before the data reached it
  with open(_largest_file(step_dir), "r+b") as f:
    f.truncate(0)


def _flip_bytes(step_dir):
  path = pathlib.Path(_largest_file(step_dir))
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
  path.write_bytes(bytes(data))


def _break_json(step_dir):
  (step_dir / "meta" / "metadata").write_text('{"step": 5, "arr')


def _change_checksum(step_dir):
  path = step_dir / "meta" / "metadata"
  meta = json.loads(path.read_text())
  meta["arrays"]["opt_state/inner/1/0/nu/head"]["sha256"] = "0" * 64
  path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
  ("damage", "reason"),
  [
    (_truncate, r"ValueError: .*"),
    (_empty, r".+"),  # Orbax may raise a bare Exception here
    (_flip_bytes, r".+"),  # a decoding error, or an array that no longer matches its sha256
    (_break_json, r"JSONDecodeError: .*"),
    (_change_checksum, r"array opt_state/inner/1/0/nu/head does not match its checksum"),
  ],
  ids=["truncated_file", "empty_file", "flipped_bytes", "unreadable_json", "checksum_mismatch"],
)
def test_damaged_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, damage, reason):
  ckpt_dir = tmp_path / "checkpoints"
  _save(ckpt_dir, [3, 5])
  damage(ckpt_dir / "5")
  messages = []
  step, state, _ = _restore(ckpt_dir, _state(0), messages)
  assert step == 3
  _assert_trees_equal(state, _state(3))
  assert len(messages) == 1
  assert messages[0].startswith(f"checkpoint step 5 in {ckpt_dir} is damaged (")
  assert f"moved it to {tmp_path}/checkpoints_damaged/5 " in messages[0]
  assert re.search(reason, messages[0])
  assert sorted(os.listdir(ckpt_dir)) == ["3"]
  # The step can be written again, and a second damage of it is kept apart from the first.
  _save(ckpt_dir, [5])
  damage(ckpt_dir / "5")
  assert _restore(ckpt_dir, _state(0))[0] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["5", "5.1"]


def test_no_intact_step_starts_fresh_with_a_message(tmp_path):
  _save(tmp_path / "checkpoints", [2])
  _truncate(tmp_path / "checkpoints" / "2")
  messages = []
  assert _restore(tmp_path / "checkpoints", _state(0), messages) is None
  assert "starting from step 0" in messages[-1]


def test_a_meta_the_run_cannot_resume_from_is_an_error_not_damage(tmp_path):
  _save(tmp_path, [2])

  def check_meta(meta):
    raise ValueError("saved with rank=2 but the model has rank=3")

  ckpts = checkpoint_lib.Checkpoints(str(tmp_path), keep=2)
  with pytest.raises(ValueError, match="rank=3"):
    ckpts.restore_latest(_state(0), check_meta=check_meta, log=print)
  ckpts.close()
  assert os.path.isdir(tmp_path / "2")
