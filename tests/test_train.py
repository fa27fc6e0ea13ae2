"""End to end: LoRA training of a linen transformer and an NNX model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from helpers import all_eqns, assert_trees_equal

import lorax_fn as lora_fn

K = jax.random.key
D, HEADS, MLP, CLASSES = 12, 2, 20, 7


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(h, h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(D, name="mlp_out")(nn.gelu(nn.Dense(MLP, name="mlp_in")(h)))
    return x + h, None


class Transformer(nn.Module):
  """Embed + Conv stem tokens, an nn.scan over remat'd blocks, a classifier head."""

  @nn.compact
  def __call__(self, ids, img):
    tok = nn.Embed(11, D, name="embed")(ids)
    patches = nn.Conv(D, (2, 2), strides=(2, 2), name="stem")(img)
    x = jnp.concatenate([tok, patches.reshape(img.shape[0], -1, D)], axis=1)
    blocks = nn.scan(
      nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(CLASSES, name="head")(nn.LayerNorm()(x).mean(axis=1))


def _data():
  ids = jax.random.randint(K(1), (9, 3), 0, 11)
  img = jax.random.normal(K(2), (9, 6, 6, 3))
  labels = jax.random.randint(K(3), (9,), 0, CLASSES)
  return ids, img, labels


def _frozen_dots_of_kernel_shape(jaxpr, shapes):
  """dot_general outputs (in any sub-jaxpr) shaped like a frozen kernel: its gradient."""
  return [
    v.aval.shape
    for eqn in all_eqns(jaxpr)
    if eqn.primitive.name == "dot_general"
    for v in eqn.outvars
    if v.aval.shape in shapes
  ]


def _kernel_shapes(params):
  shapes = set()
  for leaf in jax.tree.leaves(params, is_leaf=lora_fn.is_lora):
    if lora_fn.is_lora(leaf):
      shapes |= {leaf.shape, leaf.shape[1:] if leaf.roles[0] == "stack" else leaf.shape}
  return shapes


def test_linen_transformer_trains_adapters_only():
  model = Transformer()
  ids, img, labels = _data()
  base = model.init(K(0), ids, img)
  layouts = lora_fn.infer_layouts(model.apply, base, ids, img)
  params = lora_fn.wrap(
    base, rank=3, targets=("query", "value", "mlp_in", "stem", "embed"), layouts=layouts, key=K(4)
  )
  tx = lora_fn.optimizer(optax.adam(2e-2), params, trainable=("head",))
  opt_state = tx.init(params)
  apply = lora_fn.lora(model.apply)

  def loss_fn(trainable, frozen):
    logits = apply(lora_fn.combine(trainable, frozen), ids, img)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state):
    trainable, frozen = lora_fn.split(params, trainable=("head",))
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  # No full-size gradient for any frozen kernel anywhere in the step...
  shapes = _kernel_shapes(params)
  assert not _frozen_dots_of_kernel_shape(jax.make_jaxpr(step)(params, opt_state).jaxpr, shapes)
  # ...while full fine-tuning of the same model does form them (so the check can fail).
  full = jax.make_jaxpr(jax.grad(lambda p: model.apply(p, ids, img).sum()))(base)
  assert _frozen_dots_of_kernel_shape(full.jaxpr, shapes)

  step = jax.jit(step)
  params0, losses = params, []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  # Every frozen leaf (base kernels, biases, norms) is bit-identical after training.
  assert_trees_equal(
    lora_fn.split(params, trainable=("head",))[1], lora_fn.split(params0, trainable=("head",))[1]
  )
  # Optimizer state: nothing the size of a frozen kernel.
  frozen_sizes = {int(np.prod(s)) for s in shapes}
  assert not [x.shape for x in jax.tree.leaves(opt_state) if x.size in frozen_sizes]
  # The trained adapters change the model, and merging keeps the same function.
  np.testing.assert_allclose(
    apply(params, ids, img), model.apply(lora_fn.merge(params), ids, img), rtol=1e-4, atol=1e-5
  )


def test_nnx_model_trains_adapters_only():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 13, rngs=rngs)
      self.fc1 = nnx.Linear(13, 17, rngs=rngs)
      self.fc2 = nnx.Linear(17, 5, rngs=rngs)

    def __call__(self, ids):
      return self.fc2(nnx.relu(self.fc1(self.embed(ids)))).mean(axis=1)

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  params = lora_fn.wrap(state, rank=2, targets=("fc1", "fc2", "embed"), key=K(1))
  ids = jax.random.randint(K(2), (8, 4), 0, 11)
  y = jax.random.normal(K(3), (8, 5))
  apply = lora_fn.lora(lambda s, x: nnx.merge(graphdef, s)(x))
  tx = lora_fn.optimizer(optax.adam(3e-2), params)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    trainable, frozen = lora_fn.split(params)
    loss_fn = lambda t: jnp.mean((apply(lora_fn.combine(t, frozen), ids) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora_fn.combine(optax.apply_updates(trainable, updates), frozen), opt_state, loss

  start = params
  losses = []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert_trees_equal(lora_fn.unwrap(params), lora_fn.unwrap(start))
  model = nnx.merge(graphdef, lora_fn.merge(params))
  np.testing.assert_allclose(model(ids), apply(params, ids), rtol=1e-5, atol=1e-6)
