"""QLoRA: LoRA over an NF4 / int4 / int8 base through ``lora(fn)``, training and checkpoints."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import all_eqns, assert_trees_close, assert_trees_equal, explicit_delta, randomize
from sharded_train import Model

import lorax_fn as lora_fn

K = jax.random.key


TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


def _setup(kind="nf4"):
  model = Model()
  x = jax.random.normal(K(1), (6, 7, 9))
  base = model.init(K(0), x)
  quant = lora_fn.quantize(base, kind, targets=TARGETS, block_size=32)
  return model, x, base, quant


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8"])
def test_qlora_output_equals_merged_model(kind):
  model, x, _, quant = _setup(kind)
  params = randomize(lora_fn.wrap(quant, rank=3, targets=TARGETS, key=K(2)), K(3), scale=0.2)
  got = jax.jit(lora_fn.lora(model.apply))(params, x)
  merged = lora_fn.merge(params, dtype=jnp.float32)
  assert_trees_close(got, model.apply(merged, x), rtol=1e-5)


def test_quantized_model_runs_without_lora_and_dequantises_close_to_base():
  model, x, base, quant = _setup("nf4")
  got = lora_fn.lora(model.apply)(quant, x)
  np.testing.assert_allclose(got, model.apply(lora_fn.merge(quant), x), rtol=1e-5, atol=1e-6)
  want = np.asarray(model.apply(base, x))
  assert np.abs(np.asarray(got) - want).max() < 0.3 * np.abs(want).max()  # NF4 is lossy


def test_qlora_trains_and_the_quantised_base_stays_bit_identical():
  model, x, _, quant = _setup("nf4")
  y = jax.random.randint(K(4), (6,), 0, 5)
  params = lora_fn.wrap(quant, rank=4, targets=TARGETS, key=K(5))
  tx = lora_fn.optimizer(optax.adam(3e-2), params, trainable=("head",))
  opt_state = tx.init(params)
  apply = lora_fn.lora(model.apply)

  @jax.jit
  def step(params, opt_state):
    trainable, frozen = lora_fn.split(params, trainable=("head",))

    def loss_fn(t):
      logits = apply(lora_fn.combine(t, frozen), x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  start, losses = params, []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  frozen = lambda p: lora_fn.split(p, trainable=("head",))[1]
  assert_trees_equal(frozen(params), frozen(start))
  assert lora_fn.unwrap(params)["params"]["b0"]["attn"]["query"]["kernel"].codes.dtype == jnp.uint8


def test_summary_counts_quantised_parameters_like_peft():
  _, _, base, quant = _setup("nf4")
  params = lora_fn.wrap(quant, rank=2, targets=("query",), key=K(0))
  plain = lora_fn.wrap(base, rank=2, targets=("query",), key=K(0))
  assert lora_fn.summary(params).splitlines()[0] == lora_fn.summary(plain).splitlines()[0]


def test_orbax_round_trip_of_a_quantised_base(tmp_path):
  _, _, _, quant = _setup("nf4")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", quant)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "q", quant)
  assert_trees_equal(restored, quant)
  assert jax.tree.structure(restored) == jax.tree.structure(quant)


def test_save_adapter_skips_the_quantised_base(tmp_path):
  _, _, _, quant = _setup("nf4")
  params = lora_fn.wrap(quant, rank=2, targets=("query",), key=K(0))
  lora_fn.save_adapter(tmp_path / "a", params)
  config = lora_fn.read_adapter_config(tmp_path / "a")
  assert sorted(config["arrays"]) == sorted(
    f"params/{b}/attn/query/kernel/{f}" for b in ("b0", "b1") for f in "ab"
  )


ERRORS = [
  (
    dict(kind="nf8", targets=("query",)),
    ValueError,
    r"kind must be one of \('nf4', 'int4', "
    r"'int8'\); got: 'nf8'",
  ),
  (
    dict(kind="nf4", targets=("query",), block_size=48),
    ValueError,
    r"block_size must be a positive power of two; got: 48",
  ),
  (dict(kind="nf4", targets=("qeury",)), ValueError, r"targets \('qeury',\) matched no parameter"),
]


@pytest.mark.parametrize("kwargs, exc, regex", ERRORS)
def test_quantize_errors(kwargs, exc, regex):
  _, _, base, _ = _setup()
  kind = kwargs.pop("kind")
  with pytest.raises(exc, match=regex):
    lora_fn.quantize(base, kind, **kwargs)


def test_quantize_twice_and_non_float_are_errors():
  _, _, _, quant = _setup()
  with pytest.raises(
    ValueError,
    match=r"the leaf at 'params/b0/attn/query/kernel' is already "
    r"quantised \(nf4\)",
  ):
    lora_fn.quantize(quant, "nf4", targets=("query",))
  with pytest.raises(
    TypeError, match=r"the targeted leaf at 'ids' must be a float array; got: int32"
  ):
    lora_fn.quantize({"ids": jnp.zeros((4, 4), jnp.int32)}, "int8", targets=("ids",))


@pytest.mark.parametrize("torch_order", [False, True])
@pytest.mark.parametrize("contract_axis", [0, 1])
def test_chunked_decode_matches_merged(contract_axis, torch_order):
  # Axis 0 of the kernel contracted (Dense) or free (a (out, in) kernel): both are decoded
  # chunk by chunk inside a scan (64 rows x 96 / block 32 gives several chunks). Codes in
  # PyTorch order run along the kernel's last axis: chunks of its columns.
  w = jax.random.normal(K(0), (64, 96)) * 0.1
  roles = ("in", "out") if contract_axis == 0 else ("out", "in")
  x = jax.random.normal(K(1), (5, 64 if contract_axis == 0 else 96))

  def fn(p, x):
    return jax.lax.dot_general(x, p["w"], (((1,), (contract_axis,)), ((), ())))

  q = lora_fn.quantize({"w": w}, "nf4", targets=("w",), block_size=32, torch_order=torch_order)
  assert q["w"].transposed is torch_order
  params = randomize(lora_fn.wrap(q, rank=3, targets=("w",), layouts={"w": roles}, key=K(2)), K(3))
  import lorax_fn._rules as rules

  old = rules.CHUNK_ELEMENTS
  rules.CHUNK_ELEMENTS = 64 * 96 // 4
  try:
    jaxpr = jax.make_jaxpr(lora_fn.lora(fn))(params, x)
    got = jax.jit(lora_fn.lora(fn))(params, x)
    train, frozen = lora_fn.split(params)
    grads = jax.jit(jax.grad(lambda t: lora_fn.lora(fn)(lora_fn.combine(t, frozen), x).sum()))(
      train
    )
  finally:
    rules.CHUNK_ELEMENTS = old
  assert any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)
  assert_trees_close(got, fn(lora_fn.merge(params, dtype=jnp.float32), x), rtol=1e-5)
  merged_loss = lambda t: fn(lora_fn.merge(lora_fn.combine(t, frozen)), x).sum()
  assert_trees_close(grads, jax.grad(merged_loss)(train), rtol=1e-4)


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(48, name="mlp")(x) @ jnp.ones((48, 32)) * 0.1), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return layers(name="layers")(x, None)[0].sum(-1)


def _float_values_of_shape(jaxpr, shape):
  """Float values shaped ``shape`` produced anywhere in ``jaxpr`` (sub-jaxprs included)."""
  return [
    v.aval
    for eqn in all_eqns(jaxpr)
    for v in eqn.outvars
    if v.aval.shape == shape and jnp.issubdtype(v.aval.dtype, jnp.floating)
  ]


@pytest.mark.parametrize("torch_order", [False, True])
def test_scanned_qlora_decodes_one_layer_at_a_time(torch_order):
  model, x = _Scanned(), jax.random.normal(K(1), (5, 32))
  quant = lora_fn.quantize(
    model.init(K(0), x), "nf4", targets=("mlp",), block_size=64, torch_order=torch_order
  )
  layouts = lora_fn.infer_layouts(model.apply, quant, x)
  params = randomize(lora_fn.wrap(quant, rank=4, targets=("mlp",), layouts=layouts, key=K(2)), K(3))
  train, frozen = lora_fn.split(params)
  loss = lambda t: lora_fn.lora(model.apply)(lora_fn.combine(t, frozen), x).sum()
  merged_loss = lambda t: model.apply(lora_fn.merge(lora_fn.combine(t, frozen)), x).sum()
  assert_trees_close(jax.jit(loss)(train), merged_loss(train), rtol=1e-5)
  assert_trees_close(jax.jit(jax.grad(loss))(train), jax.grad(merged_loss)(train), rtol=1e-4)
  # Neither the forward nor the backward pass forms the float stack of all three layers.
  assert not _float_values_of_shape(jax.make_jaxpr(jax.grad(loss))(train).jaxpr, (3, 32, 48))
  assert _float_values_of_shape(jax.make_jaxpr(jax.grad(merged_loss))(train).jaxpr, (3, 32, 48))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_lora_over_a_transposed_quantised_kernel_is_the_formula(jit):
  """QLoRA over PyTorch-order codes: ``x @ (deq(W) + s·A·B)`` with the (in, out) kernel."""
  w = np.asarray(jax.random.normal(K(0), (7, 11)))  # (in, out)
  q = lora_fn.quantize({"w": w}, "nf4", targets=("w",), block_size=16, torch_order=True)
  assert q["w"].transposed and q["w"].shape == (7, 11) and q["w"].stored_shape == (11, 7)
  params = randomize(lora_fn.wrap(q, rank=3, targets=("w",), key=K(1)), K(2))
  x = jax.random.normal(K(3), (5, 7))
  fn = lora_fn.lora(lambda p, x: x @ p["w"])
  got = (jax.jit(fn) if jit else fn)(params, x)
  leaf = params["w"]
  kernel = np.asarray(leaf.w.dequantize(), np.float64) + explicit_delta(leaf)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(x, np.float64) @ kernel, rtol=1e-5, atol=1e-6
  )
  # The codes are those of the PyTorch weight (out, in) = w.T: exactly what quantising it gives.
  direct = lora_fn.quantize({"w": w.T}, "nf4", targets=("w",), block_size=16)["w"]
  np.testing.assert_array_equal(np.asarray(q["w"].codes), np.asarray(direct.codes))
  np.testing.assert_array_equal(np.asarray(leaf.w.dequantize()), np.asarray(direct.dequantize()).T)
