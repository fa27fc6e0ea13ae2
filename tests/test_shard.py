"""Sharding: partition specs derived from the base's, meshes, and real multi-device runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import lorax_fn as lora_fn

K = jax.random.key
HERE = os.path.dirname(os.path.abspath(__file__))
MESH = AbstractMesh((2, 4), ("data", "fsdp"))
TP = AbstractMesh((2, 2, 2), ("data", "fsdp", "model"))


def _params():
  return {
    "dense": {"kernel": jnp.ones((64, 24)), "bias": jnp.zeros(24)},  # (in, out)
    "qkv": {"kernel": jnp.ones((40, 4, 6))},  # DenseGeneral (in, heads, head_dim)
    "stack": {"kernel": jnp.ones((3, 16, 56))},  # nn.scan-stacked (stack, in, out)
    "norm": {"scale": jnp.ones(40)},
  }


LAYOUTS = {"qkv/kernel": ("in", "out", "out"), "stack/kernel": ("stack", "in", "out")}


def _wrapped(params=None, **kwargs):
  return lora_fn.wrap(
    params or _params(),
    rank=2,
    targets=("dense", "qkv", "stack"),
    layouts=LAYOUTS,
    key=K(0),
    **kwargs,
  )


def test_lora_factors_follow_the_base_spec():
  rules = [
    ("dense/kernel", P("fsdp", "data")),
    ("qkv/kernel", P("fsdp", None, "data")),
    ("stack/kernel", P(None, "fsdp", ("data",))),
  ]
  specs = lora_fn.partition_specs(_wrapped(), rules, mesh=MESH)
  # a: stack + (r,) + in, b: stack + (r,) + out; the rank axis replicated.
  assert (specs["dense"]["kernel"].a, specs["dense"]["kernel"].b) == (
    P(None, "fsdp"),
    P(None, "data"),
  )
  assert specs["qkv"]["kernel"].a == P(None, "fsdp")
  assert specs["qkv"]["kernel"].b == P(None, None, "data")
  assert specs["stack"]["kernel"].w == P(None, "fsdp", ("data",))
  assert specs["stack"]["kernel"].a == P(None, None, "fsdp")
  assert specs["stack"]["kernel"].b == P(None, None, ("data",))
  assert specs["dense"]["bias"] == P() and specs["norm"]["scale"] == P()  # unmatched


def test_default_fsdp_rule_splits_the_largest_divisible_axis():
  specs = lora_fn.partition_specs(_wrapped(), mesh=MESH, min_size=1000)
  assert specs["dense"]["kernel"].w == P("fsdp", None)  # 64 > 24
  assert specs["stack"]["kernel"].w == P(None, None, "fsdp")  # 56 > 16 > 3
  assert specs["stack"]["kernel"].b == P(None, None, "fsdp")
  assert specs["qkv"]["kernel"].w == P(None, None, None)  # 960 elements < min_size
  assert specs["dense"]["bias"] == P(None)
  # Tensor parallelism: the next largest divisible axis over "model".
  tp = lora_fn.partition_specs(_wrapped(), mesh=TP, min_size=1000)
  assert tp["dense"]["kernel"].w == P("fsdp", "model")
  assert tp["dense"]["kernel"].a == P(None, "fsdp") and tp["dense"]["kernel"].b == P(None, "model")
  assert tp["stack"]["kernel"].w == P(None, "model", "fsdp")


def test_default_rule_warns_and_replicates_what_does_not_divide():
  params = {"odd": jnp.ones((33, 35))}
  with pytest.warns(
    lora_fn.ShardingWarning, match=r"odd \(33, 35\) \(no axis divisible by fsdp=4\)"
  ):
    specs = lora_fn.partition_specs(params, mesh=MESH, min_size=1)
  assert specs["odd"] == P(None, None)


def test_quantised_leaves_split_along_the_block_axis():
  params = lora_fn.quantize(_params(), "nf4", targets=("dense",), block_size=32)
  params = _wrapped(params)
  spec = lora_fn.partition_specs(params, [("dense/kernel", P("fsdp", None))], mesh=MESH)
  q = spec["dense"]["kernel"].w
  # 64x24 = 1536 codes in 48 blocks: 12 per device. 1 scale block: replicated; offset too.
  assert (q.codes, q.absmax_codes, q.absmax_scale, q.offset, q.absmax) == (
    P("fsdp"),
    P("fsdp"),
    P(),
    P(),
    None,
  )
  assert spec["dense"]["kernel"].a == P(None, "fsdp")
  plain = lora_fn.quantize(_params(), "int8", targets=("dense",), block_size=64, double_quant=False)
  q = lora_fn.partition_specs(plain, [("dense/kernel", P(None, ("data", "fsdp")))], mesh=MESH)
  assert (q["dense"]["kernel"].codes, q["dense"]["kernel"].absmax) == (
    P(("data", "fsdp")),
    P(("data", "fsdp")),
  )


def test_a_spec_tree_for_the_base():
  params = _wrapped()
  base_specs = jax.tree.map(lambda _: P(), lora_fn.unwrap(params))
  base_specs["dense"]["kernel"] = P(None, "fsdp")
  specs = lora_fn.partition_specs(params, base_specs, mesh=MESH)
  assert specs["dense"]["kernel"].w == P(None, "fsdp")
  assert specs["dense"]["kernel"].b == P(None, "fsdp")
  with pytest.raises(
    ValueError, match=r"the spec tree has 1 leaves, the base 5; not in the base: \['dense'\]"
  ):
    lora_fn.partition_specs(params, {"dense": P()}, mesh=MESH)


SPEC_ERRORS = [
  (
    [("dense/kernel", P("model", None))],
    r"the partition spec P\('model', None\) for 'dense/kernel' uses mesh axis "
    r"'model'; the mesh has axes \('data', 'fsdp'\)",
  ),
  (
    [("dense/kernel", P(None, "fsdp", None))],
    r"the partition spec for 'dense/kernel' has 3 entries; the leaf has shape \(64, 24\)",
  ),
  (
    [("qkv/kernel", P(None, None, "fsdp"))],
    r"the partition spec P\(None, None, 'fsdp'\) for 'qkv/kernel' splits an axis "
    r"of size 6 over fsdp=4, which does not divide it \(shape \(40, 4, 6\)\)",
  ),
  (
    [("stack/kernel", P(("data", "fsdp")))],
    r"splits an axis of size 3 over data\*fsdp=8, which does not divide it",
  ),
  ([("dense/kernal", P())], r"sharding rules \['dense/kernal'\] matched no parameter"),
  ("zero3", r"rules must be 'fsdp', 'replicate', a rule list or a spec tree; got: 'zero3'"),
  (
    [("dense/(kernel", P())],
    r"sharding rule 'dense/\(kernel' is not a valid regular expression: missing \)",
  ),
]


@pytest.mark.parametrize("rules, regex", SPEC_ERRORS)
def test_partition_spec_errors(rules, regex):
  with pytest.raises(ValueError, match=regex):
    lora_fn.partition_specs(_wrapped(), rules, mesh=MESH)


def test_quantised_leaf_that_cannot_split_on_whole_blocks():
  params = {"w": jnp.ones((8, 12))}  # 96 values: 3 blocks of 32
  q = lora_fn.quantize(params, "nf4", targets=("w",), block_size=32)
  with pytest.raises(
    ValueError,
    match=r"the quantised leaf 'w' \(shape \(8, 12\), 3 blocks of 32\) cannot be split over "
    r"fsdp=4 on whole blocks",
  ):
    lora_fn.partition_specs(q, [("w", P("fsdp", None))], mesh=MESH)
  with pytest.warns(lora_fn.ShardingWarning, match=r"w \(8, 12\) \(blocks not divisible by 4\)"):
    spec = lora_fn.partition_specs(q, mesh=MESH, min_size=1)
  assert spec["w"].codes == P()


MESH_ERRORS = [
  ("data=2", r"mesh data=2 has 2 devices, but there are 1; make the sizes multiply"),
  ("data=-1,fsdp=-1", r"at most one mesh axis may be -1"),
  (
    "data=1,tensor=1",
    r"mesh axes must be distinct names from \('data', 'fsdp', 'model'\); got: \['data', 'tensor'\]",
  ),
  ("data:2", r"mesh must look like 'data=2,fsdp=4'; got: 'data:2'"),
  ("data=0", r"mesh axis sizes must be positive integers or -1; got: data=0"),
]


@pytest.mark.parametrize("axes, regex", MESH_ERRORS)
def test_make_mesh_errors(axes, regex):
  with pytest.raises(ValueError, match=regex):
    lora_fn.make_mesh(axes, devices=jax.devices()[:1])


def test_shard_and_state_shardings_on_one_device():
  mesh = lora_fn.make_mesh("data=1,fsdp=1", devices=jax.devices()[:1])
  params = lora_fn.shard(_wrapped(), mesh, min_size=1)
  assert params["dense"]["kernel"].a.sharding.mesh == mesh
  trainable, _ = lora_fn.split(params)
  tx = lora_fn.optimizer(optax.adam(1e-3), params)
  out = lora_fn.state_shardings(jax.eval_shape(tx.init, trainable), trainable)
  state = jax.jit(tx.init, out_shardings=out)(trainable)
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(state))
  with pytest.raises(ValueError, match=r"params must be placed on a mesh first"):
    lora_fn.state_shardings(state, {"x": np.ones(3)})


def _run(args, env_extra=None, timeout=600, **kw):
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  env |= env_extra or {}
  return subprocess.Popen(
    [sys.executable, *args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


def _wait(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded") / "result.npz"
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  _wait(_run([os.path.join(HERE, "sharded_train.py"), str(out)], flags))
  return np.load(out)


@pytest.mark.parametrize("kind", ["f32", "nf4"])
@pytest.mark.parametrize("mesh", ["8x1", "2x4", "1x8"])
def test_sharded_training_matches_one_device(eight_devices, kind, mesh):
  r = eight_devices
  np.testing.assert_allclose(r[f"{kind}/{mesh}/losses"], r[f"{kind}/1/losses"], rtol=1e-5)
  names = [k.split("/", 2)[2] for k in r.files if k.startswith(f"{kind}/1/[")]
  assert len(names) == 26  # 24 factors, the head kernel and bias
  for name in names:
    want = r[f"{kind}/1/{name}"]
    np.testing.assert_allclose(
      r[f"{kind}/{mesh}/{name}"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name
    )


@pytest.mark.parametrize("kind", ["f32", "nf4"])
@pytest.mark.parametrize("mesh, n", [("8x1", 1), ("2x4", 4), ("1x8", 8)])
def test_each_device_holds_its_share_of_the_base(eight_devices, kind, mesh, n):
  r = eight_devices
  per_device = r[f"{kind}/{mesh}/split_per_device"]
  if n == 1:  # pure data parallelism: the base is replicated
    assert r[f"{kind}/{mesh}/split_total"] == 0
    return
  assert len(per_device) == 8
  assert (per_device * n == r[f"{kind}/{mesh}/split_total"]).all()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_save_and_restore_like_one(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  single.mkdir()
  multi.mkdir()
  worker = os.path.join(HERE, "dist_worker.py")
  port = str(_free_port())
  procs = [_run([worker, str(i), "2", port, str(multi)]) for i in range(2)]
  ref = _run([worker, "--single", str(single)])
  for p in (*procs, ref):
    _wait(p)
  a, b = np.load(single / "result.npz"), np.load(multi / "result.npz")
  assert int(b["process_count"]) == 2
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
  trained = [k for k in a.files if k.startswith("trained")]
  assert len(trained) == 26
  for k in trained:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5 * np.abs(a[k]).max(), err_msg=k)
    np.testing.assert_array_equal(b[k.replace("trained", "restored", 1)], b[k])
  # The NF4 codes are split over fsdp=2: each device holds half.
  assert (b["codes_per_device"] * 2 == b["codes_total"]).all()


def test_specs_of_split_halves_match_the_whole():
  params = _wrapped()
  whole = lora_fn.partition_specs(params, mesh=MESH, min_size=1000)
  trainable, frozen = lora_fn.split(params)
  t_specs = lora_fn.partition_specs(trainable, mesh=MESH, min_size=1000)
  f_specs = lora_fn.partition_specs(frozen, mesh=MESH, min_size=1000)
  assert t_specs["stack"]["kernel"].w is None and f_specs["stack"]["kernel"].a is None
  assert t_specs["stack"]["kernel"].b == whole["stack"]["kernel"].b
  assert f_specs["stack"]["kernel"].w == whole["stack"]["kernel"].w
  assert jax.tree.structure(t_specs) == jax.tree.structure(trainable)


def test_more_mesh_and_rule_errors():
  with pytest.raises(
    ValueError, match=r"mesh data=3,fsdp=-1: 1 devices do not divide into the fixed axes \(3\)"
  ):
    lora_fn.make_mesh("data=3,fsdp=-1", devices=jax.devices()[:1])
  with pytest.raises(
    TypeError,
    match=r"the spec of rule 'dense/kernel' must be a PartitionSpec, 'fsdp' or None; got: 'zero3'",
  ):
    lora_fn.partition_specs(_wrapped(), [("dense/kernel", "zero3")], mesh=MESH)
  with pytest.raises(ValueError, match=r"params has no arrays to take shardings from"):
    lora_fn.state_shardings({}, {})


def test_shard_reshards_placed_arrays():
  mesh = lora_fn.make_mesh("fsdp=1", devices=jax.devices()[:1])
  placed = lora_fn.shard(_wrapped(), mesh, [("dense/kernel", P("fsdp", None))])
  again = lora_fn.shard(placed, mesh, "replicate")
  assert again["dense"]["kernel"].w.sharding.spec == P()
  np.testing.assert_array_equal(again["dense"]["kernel"].a, placed["dense"]["kernel"].a)
