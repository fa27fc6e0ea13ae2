"""DoRA (``wrap(..., dora=True)``) against PEFT's ``use_dora=True`` and the explicit formula.

A torch model with an Embedding, a Conv2d and Linear layers (pairwise-distinct sizes) and its
Flax twin get the same factors and magnitudes copied into both; outputs and the gradients of
A, B and m must agree to 1e-5, jitted and eager. Attention kernels (``DenseGeneral``) and a
scanned stack are checked against ``m / ‖W + s·BA‖ ⊙ (W + s·BA)`` formed explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
  TWIN_MODULES,
  TWIN_SIZES,
  assert_trees_close,
  explicit_delta,
  peft_dora_factors,
  torch_apply,
  torch_net,
  twin_apply,
  twin_inputs,
  twin_params,
)

import lorax_fn as lora_fn

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

K = jax.random.key
VOCAB, D, HID, OUT = TWIN_SIZES
MODULES = TWIN_MODULES
TARGETS = ("embed", "conv", "fc1", "fc2")
apply_jit = jax.jit(twin_apply)  # one compiled twin for the tests below


def _peft_model(seed=3):
  """PEFT's DoRA model with random A, B and magnitudes (B != 0, m != ‖W‖)."""
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(TARGETS), use_dora=True)
  model = peft.get_peft_model(torch_net(), config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
      elif "lora_" in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _ours_from(model):
  """Our DoRA params holding PEFT's base weights, factors and magnitudes."""
  base = twin_params(torch_net())
  params = lora_fn.wrap(base, rank=3, alpha=5.0, targets=TARGETS, dora=True, key=K(0))
  for name, (a, b, m) in peft_dora_factors(model).items():
    kernel = "embedding" if name == "embed" else "kernel"
    leaf = params[name][kernel]
    params[name][kernel] = dataclasses.replace(
      leaf, a=jnp.asarray(a), b=jnp.asarray(b), m=jnp.asarray(m)
    )
  return params


def _inputs():
  ids, img = twin_inputs()
  proj = np.random.default_rng(1).normal(size=(7, OUT)).astype(np.float32)
  return ids, img, proj


def test_initial_magnitudes_are_peft_s():
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(TARGETS), use_dora=True)
  fresh = peft_dora_factors(peft.get_peft_model(torch_net(), config))
  params = lora_fn.wrap(
    twin_params(torch_net()), rank=3, alpha=5.0, targets=TARGETS, dora=True, key=K(0)
  )
  for name in TARGETS:
    leaf = params[name]["embedding" if name == "embed" else "kernel"]
    np.testing.assert_allclose(leaf.m, fresh[name][2], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_outputs_and_gradients_equal_peft(jit):
  model = _peft_model()
  train, frozen = lora_fn.split(_ours_from(model))
  ids, img, proj = _inputs()

  def loss(train):
    out = twin_apply(lora_fn.combine(train, frozen), ids, img)
    return jnp.sum(out * proj), out

  value_and_grad = jax.value_and_grad(loss, has_aux=True)
  (value, ours), grads = (jax.jit(value_and_grad) if jit else value_and_grad)(train)
  out = model(torch.as_tensor(ids), torch.as_tensor(img))
  theirs = (out * torch.as_tensor(proj)).sum()
  theirs.backward()
  np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ours), out.detach().numpy(), rtol=1e-5, atol=1e-6)
  for name, (ga, gb, gm) in peft_dora_factors(model, grads=True).items():
    leaf = grads[name]["embedding" if name == "embed" else "kernel"]
    assert leaf.w is None  # no gradient is ever formed for W
    assert_trees_close((leaf.a, leaf.b, leaf.m), (ga, gb, gm), rtol=1e-5)


def test_merge_equals_the_unmerged_model_and_peft_merge_and_unload():
  model = _peft_model()
  params = _ours_from(model)
  ids, img, _ = _inputs()
  merged = jax.jit(lora_fn.merge)(params)
  np.testing.assert_allclose(
    np.asarray(apply_jit(merged, ids, img)),
    np.asarray(apply_jit(params, ids, img)),
    rtol=1e-5,
    atol=1e-6,
  )
  theirs = twin_params(model.merge_and_unload())
  assert_trees_close(merged, theirs, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Any kernel layout: DenseGeneral (attention) kernels in a scanned stack, against the formula.
# ------------------------------------------------------------------------------------------


def explicit_dora(leaf):
  """``m / ‖W + s·BA‖ ⊙ (W + s·BA)`` by reshapes and a matmul, the norm detached (jnp)."""
  roles, shape = leaf.roles, leaf.shape
  stack = [i for i, r in enumerate(roles) if r == "stack"]
  ins = [i for i, r in enumerate(roles) if r == "in"]
  outs = [i for i, r in enumerate(roles) if r == "out"]
  s = math.prod(shape[i] for i in stack)
  a = leaf.a.reshape(s, leaf.rank, -1).transpose(0, 2, 1)
  b = leaf.b.reshape(s, leaf.rank, -1)
  delta = (leaf.alpha / leaf.rank) * (a @ b)
  delta = delta.reshape([shape[i] for i in stack + ins + outs])
  merged = leaf.w + jnp.transpose(delta, np.argsort(stack + ins + outs))
  norm = jnp.sqrt(jnp.sum(merged**2, axis=tuple(ins), keepdims=True))
  return merged * jnp.expand_dims(leaf.m, ins) / jax.lax.stop_gradient(norm)


def _explicit(params):
  one = lambda x: explicit_dora(x) if lora_fn.is_lora(x) else x
  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        q = nn.DenseGeneral((2, 5), name="query")(h)  # kernel (in, heads, head_dim)
        h = h + nn.DenseGeneral(7, axis=(-2, -1), name="out")(jnp.tanh(q))  # (heads, hd, out)
        return jnp.tanh(nn.Dense(7, name="fc")(h)), None

    blocks = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return blocks(name="blocks")(x, None)[0]


def _np_params(shapes, rng, scale=0.3):
  """Random float32 arrays of the shapes of a tree (numpy: nothing to compile)."""
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32), shapes)


def _with_random_factors(params, rng):
  """Random A, B and a magnitude 1.2x its initial norms (a trained DoRA leaf)."""

  def one(x):
    if not lora_fn.is_lora(x):
      return x
    a, b = (jnp.asarray(0.3 * rng.normal(size=f.shape), jnp.float32) for f in (x.a, x.b))
    return dataclasses.replace(x, a=a, b=b, m=jnp.asarray(np.asarray(x.m) * 1.2))

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def _dora_leaf(w, roles, rng, rank=2, alpha=3.0):
  """A trained DoRA leaf built by hand: random A, B; m 1.2x the norms of W + s·BA."""
  dims = lambda *kinds: [d for d, r in zip(w.shape, roles, strict=True) if r in kinds]
  stack = dims("stack")
  a = jnp.asarray(0.3 * rng.normal(size=(*stack, rank, *dims("in"))), jnp.float32)
  b = jnp.asarray(0.3 * rng.normal(size=(*stack, rank, *dims("out"))), jnp.float32)
  leaf = lora_fn.LoraLeaf(w, a, b, roles, rank, alpha)
  ins = tuple(i for i, r in enumerate(roles) if r == "in")
  norm = np.sqrt(np.sum((np.asarray(w, np.float64) + explicit_delta(leaf)) ** 2, axis=ins))
  return dataclasses.replace(leaf, m=jnp.asarray(1.2 * norm, jnp.float32))


def _attention_params():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  params = _np_params(jax.eval_shape(Attention().init, K(0), x)["params"], rng)
  blocks = params["blocks"]
  for name, roles in (
    ("query", ("stack", "in", "out", "out")),
    ("out", ("stack", "in", "in", "out")),
    ("fc", ("stack", "in", "out")),
  ):
    blocks[name]["kernel"] = _dora_leaf(blocks[name]["kernel"], roles, rng)
  return params, x


def test_dense_general_kernels_in_a_scanned_stack_equal_the_explicit_formula():
  params, x = _attention_params()
  assert params["blocks"]["query"]["kernel"].m.shape == (2, 2, 5)  # (stack, heads, head_dim)
  assert params["blocks"]["out"]["kernel"].m.shape == (2, 7)
  apply = lora_fn.lora(Attention().apply)
  ours = jax.value_and_grad(
    lambda train, frozen: jnp.sum(jnp.sin(apply({"params": lora_fn.combine(train, frozen)}, x)))
  )
  explicit = jax.value_and_grad(
    lambda train, frozen: jnp.sum(
      jnp.sin(Attention().apply({"params": _explicit(lora_fn.combine(train, frozen))}, x))
    )
  )

  @jax.jit  # one program for both sides and both merges
  def both(params):
    train, frozen = lora_fn.split(params)
    return (ours(train, frozen), lora_fn.merge(params)), (
      explicit(train, frozen),
      _explicit(params),
    )

  got, want = both(params)
  assert_trees_close(got, want, rtol=1e-5)


def test_a_kernel_used_transposed_is_materialised_with_its_magnitude():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  params = lora_fn.wrap({"w": w}, rank=2, targets=("w",), dora=True, key=K(0))
  params = _with_random_factors(params, rng)
  x = jnp.ones((3, 7))
  with pytest.warns(lora_fn.MaterializeWarning, match="dot_general"):
    y = jax.jit(lora_fn.lora(lambda p, x: x @ p["w"].T))(params, x)  # contracts "out"
  np.testing.assert_allclose(y, x @ jax.jit(explicit_dora)(params["w"]).T, rtol=1e-5)


def test_with_dropout_the_base_is_not_dropped():
  # PEFT: W·x + (g - 1)⊙W·drop(x) + g⊙s·B·A·drop(x); freshly wrapped (B = 0, g = 1): W·x.
  w = jnp.asarray(np.random.default_rng(2).normal(size=(5, 7)), jnp.float32)
  params = lora_fn.wrap({"w": w}, rank=2, targets=("w",), dora=True, dropout=0.5, key=K(0))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5)), jnp.float32)
  y = jax.jit(lora_fn.lora(lambda p, x: x @ p["w"]))(params, x, dropout_key=K(1))
  np.testing.assert_allclose(y, x @ w, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# QDoRA: an NF4 base, scanned.
# ------------------------------------------------------------------------------------------


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(16, name="fc")(h)), None

    blocks = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return nn.Dense(2, name="head")(blocks(name="blocks")(x, None)[0])


def test_an_nf4_base_trains():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  y = jnp.sin(x[:, :2] * 3)
  base = _np_params(jax.eval_shape(Mlp().init, K(1), x)["params"], rng)
  layouts = {"blocks/fc/kernel": ("stack", "in", "out")}
  quant = lora_fn.quantize(base, "nf4", targets=("fc",), block_size=32)
  params = lora_fn.wrap(quant, rank=2, targets=("fc",), layouts=layouts, dora=True, key=K(2))
  leaf = params["blocks"]["fc"]["kernel"]
  apply = lora_fn.lora(Mlp().apply)
  norms, ours, merged = jax.jit(
    lambda p, q: (
      jnp.linalg.norm(p["blocks"]["fc"]["kernel"].w.dequantize(), axis=1),
      apply({"params": p}, x),
      Mlp().apply({"params": lora_fn.merge(q)}, x),
    )
  )(params, quant)
  np.testing.assert_allclose(leaf.m, norms, rtol=1e-6)
  np.testing.assert_allclose(ours, merged, rtol=1e-5, atol=1e-6)  # the quantised base's model
  tx = lora_fn.optimizer(optax.adam(3e-2), params)
  state = tx.init(params)
  assert any(s.shape == (3, 16) for s in jax.tree.leaves(state))  # m's moments

  @jax.jit
  def step(params, state):
    train, frozen = lora_fn.split(params)

    def loss(train):
      out = apply({"params": lora_fn.combine(train, frozen)}, x)
      return jnp.mean((out - y) ** 2)

    value, grads = jax.value_and_grad(loss)(train)
    updates, state = tx.update(grads, state, train)
    return lora_fn.combine(optax.apply_updates(train, updates), frozen), state, value

  losses = []
  for _ in range(15):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0], losses
  assert not np.allclose(params["blocks"]["fc"]["kernel"].m, leaf.m)  # m trains


# ------------------------------------------------------------------------------------------
# PEFT files, serving, checkpoints, summary, shardings.
# ------------------------------------------------------------------------------------------


def test_save_peft_writes_use_dora_that_peft_loads(tmp_path):
  model = _peft_model()
  params = _ours_from(model)
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert config["use_dora"] is True
  from safetensors.numpy import load_file

  tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
  assert tensors["base_model.model.conv.lora_magnitude_vector"].shape == (1, D, 1, 1)
  assert tensors["base_model.model.fc1.lora_magnitude_vector"].shape == (HID,)
  loaded = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "a")).eval()
  ids, img, _ = _inputs()
  np.testing.assert_allclose(torch_apply(loaded, ids, img), torch_apply(model, ids, img), rtol=1e-6)


def test_load_peft_reads_peft_dora_adapters(tmp_path):
  model = _peft_model()
  model.save_pretrained(str(tmp_path / "p"))
  params = lora_fn.load_peft(tmp_path / "p", twin_params(torch_net()), modules=MODULES)
  assert params["conv"]["kernel"].dora and params["conv"]["kernel"].m.shape == (D,)
  ids, img, _ = _inputs()
  np.testing.assert_allclose(
    np.asarray(apply_jit(params, ids, img)), torch_apply(model, ids, img), rtol=1e-5, atol=1e-6
  )


def test_serving_problems_flag_dora():
  params = lora_fn.wrap(
    {"fc": {"kernel": jnp.ones((5, 7))}}, rank=2, targets=("fc",), dora=True, key=K(0)
  )
  assert lora_fn.serving_problems(params) == [
    "['fc/kernel'] are DoRA (use_dora): vLLM serves plain LoRA only; serve the merged weights "
    "(lorax_fn.merge) instead"
  ]


def test_checkpoint_summary_and_shardings_carry_the_magnitude(tmp_path):
  base = {"fc": {"kernel": jnp.ones((6, 8)), "bias": jnp.zeros(8)}}
  params = lora_fn.wrap(base, rank=2, targets=("fc",), dora=True, key=K(0))
  trained = jax.tree.map(lambda x: x, params)
  trained["fc"]["kernel"] = dataclasses.replace(params["fc"]["kernel"], m=jnp.arange(8.0))
  lora_fn.save_adapter(tmp_path / "c", trained)
  assert lora_fn.read_adapter_config(tmp_path / "c")["lora"]["fc/kernel"]["dora"] is True
  np.testing.assert_array_equal(
    lora_fn.restore_adapter(tmp_path / "c", params)["fc"]["kernel"].m, jnp.arange(8.0)
  )
  plain = lora_fn.wrap(base, rank=2, targets=("fc",), key=K(0))
  with pytest.raises(
    ValueError,
    match=r"'fc/kernel' was saved with dora=True but the model has "
    r"dora=False",
  ):
    lora_fn.restore_adapter(tmp_path / "c", plain)
  # PEFT counts the magnitude as a trainable parameter: 2*6 + 2*8 + 8.
  assert lora_fn.summary(params).splitlines()[0].startswith("trainable params: 36 ||")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  specs = lora_fn.partition_specs(
    params, [("fc/kernel", jax.sharding.PartitionSpec(None, "model"))], mesh=mesh
  )
  assert specs["fc"]["kernel"].m == jax.sharding.PartitionSpec("model")


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------


def _dora_params(key=0):
  return lora_fn.wrap(
    {"fc": {"kernel": jnp.ones((5, 7))}}, rank=2, targets=("fc",), dora=True, key=K(key)
  )


def _plain_params():
  return lora_fn.wrap({"fc": {"kernel": jnp.ones((5, 7))}}, rank=2, targets=("fc",), key=K(0))


def _bad_m(p):
  p["fc"]["kernel"] = dataclasses.replace(p["fc"]["kernel"], m=jnp.ones(5))
  return lora_fn.lora(lambda p, x: x @ p["fc"]["kernel"])(p, jnp.ones((2, 5)))


def _mixed_save(tmp):
  p = lora_fn.wrap(
    {"fc": {"kernel": jnp.ones((5, 7))}, "gc": {"kernel": jnp.ones((7, 3))}},
    rank=2,
    targets=("fc",),
    dora=True,
    key=K(0),
  )
  p = lora_fn.wrap(p, rank=2, targets=("gc",), key=K(1))
  lora_fn.save_peft(tmp / "m", p, modules={"fc": "fc", "gc": "gc"})


def _optimizer_mismatch():
  tx = lora_fn.optimizer(optax.sgd(0.1), _dora_params())
  plain = _plain_params()
  tx.update(plain, tx.init(_dora_params()))


ERRORS = [
  (
    "dora_not_bool",
    lambda tmp: lora_fn.wrap({"k": jnp.ones((5, 7))}, rank=2, targets=("k",), dora="yes", key=K(0)),
    TypeError,
    r"dora must be a bool; got: 'yes'",
  ),
  (
    "bad_magnitude_shape",
    lambda tmp: _bad_m(_dora_params()),
    ValueError,
    r"DoRA leaf at 'arg 0/fc/kernel': base weight of shape \(5, 7\) with layout \('in', 'out'\) "
    r"expects a magnitude m of shape \(7,\) \(its axes but the "
    r"'in' ones\); got \(5,\)",
  ),
  (
    "stack",
    lambda tmp: lora_fn.stack_adapters([_dora_params(), _dora_params(1)]),
    ValueError,
    r"adapters\[0\] has a DoRA leaf at 'fc/kernel' \(wrap\(..., dora=True\)\); stack_adapters "
    r"stacks plain LoRA factors only",
  ),
  (
    "set_adapter",
    lambda tmp: lora_fn.set_adapter(lora_fn.stack_adapters([_plain_params()]), 0, _dora_params()),
    ValueError,
    r"adapter has a DoRA leaf at 'fc/kernel'.*a stack's slots hold plain LoRA",
  ),
  (
    "mix",
    lambda tmp: lora_fn.weighted_adapter(
      [_dora_params(), _dora_params(1)], [0.5, 0.5], method="linear"
    ),
    ValueError,
    r"has a DoRA leaf at 'fc/kernel'.*weighted_adapter mixes plain LoRA factors",
  ),
  (
    "mixed_save",
    _mixed_save,
    ValueError,
    r"the LoRA leaves use dora values \[False, True\]; a PEFT config has one for all",
  ),
  (
    "optimizer",
    lambda tmp: _optimizer_mismatch(),
    ValueError,
    r"updates at 'fc/kernel' is a plain LoRA leaf; the optimizer was built for a DoRA leaf",
  ),
]


@pytest.mark.parametrize("name, fn, exc, regex", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(tmp_path, name, fn, exc, regex):
  with pytest.raises(exc, match=regex):
    fn(tmp_path)


def _write_peft(path, config, tensors):
  from safetensors.numpy import save_file

  path.mkdir()
  (path / "adapter_config.json").write_text(json.dumps(config))
  save_file(tensors, str(path / "adapter_model.safetensors"))


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc1"]}
FACTORS = {
  "base_model.model.fc1.lora_A.weight": np.zeros((2, D), np.float32),
  "base_model.model.fc1.lora_B.weight": np.zeros((HID, 2), np.float32),
}
MAGNITUDE = {"base_model.model.fc1.lora_magnitude_vector": np.ones(HID, np.float32)}
LOAD_ERRORS = [
  (
    "no_magnitude",
    {**LORA, "use_dora": True},
    FACTORS,
    r"has use_dora=True but no lora_magnitude_vector for 'fc1' \(a DoRA adapter needs one",
  ),
  (
    "magnitude_without_dora",
    LORA,
    {**FACTORS, **MAGNITUDE},
    r"has use_dora=False but a lora_magnitude_vector for 'fc1'",
  ),
  (
    "magnitude_alone",
    {**LORA, "use_dora": True},
    MAGNITUDE,
    r"has only lora_magnitude_vector for 'fc1'",
  ),
  (
    "bad_magnitude",
    {**LORA, "use_dora": True},
    {**FACTORS, "base_model.model.fc1.lora_magnitude_vector": np.ones(7, np.float32)},
    r"'base_model.model.fc1.lora_magnitude_vector' has shape \(7,\); the Linear at 'fc1/kernel' "
    r"\(kernel shape \(6, 13\), rank 2\) needs \(13,\)",
  ),
]


@pytest.mark.parametrize(
  "name, config, tensors, regex", LOAD_ERRORS, ids=[e[0] for e in LOAD_ERRORS]
)
def test_load_errors(tmp_path, name, config, tensors, regex):
  _write_peft(tmp_path / "p", config, tensors)
  with pytest.raises(ValueError, match=regex):
    lora_fn.load_peft(tmp_path / "p", twin_params(torch_net()), modules=MODULES)
