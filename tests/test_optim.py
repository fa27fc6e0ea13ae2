"""``optimizer``: only adapters (and named leaves) move; frozen leaves have no state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lora_fn


def _wrapped():
  params = {
    "dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)},
    "head": {"kernel": jnp.ones((7, 3)), "bias": jnp.zeros(3)},
  }
  return lora_fn.wrap(params, rank=2, targets=("dense",), key=jax.random.key(0))


def test_state_holds_trainable_leaves_only():
  p = _wrapped()
  tx = lora_fn.optimizer(optax.adam(1e-2), p, trainable=("head",))
  state = tx.init(p)
  sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim)
  # mu and nu for a (5, 2), b (2, 7), head kernel (7, 3) and head bias (3,): nothing of 5 x 7.
  assert sizes == sorted([10, 14, 21, 3] * 2)


@pytest.mark.parametrize("route", ["split", "full"])
def test_updates_match_plain_optax_on_the_trainable_part(route):
  p = _wrapped()
  tx = lora_fn.optimizer(optax.adamw(1e-2), p, trainable=("head",))
  state = tx.init(p)
  trainable, frozen = lora_fn.split(p, trainable=("head",))
  ref_tx = optax.adamw(1e-2)
  ref_state = ref_tx.init(trainable)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)
  ref_updates, _ = ref_tx.update(grads, ref_state, trainable)
  if route == "split":
    updates, state = jax.jit(tx.update)(grads, state, trainable)
    new = lora_fn.combine(optax.apply_updates(trainable, updates), frozen)
  else:  # a gradient for every leaf, frozen ones included
    full_grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
    updates, state = jax.jit(tx.update)(full_grads, state, p)
    new = optax.apply_updates(p, updates)
    assert not np.asarray(updates["dense"]["kernel"].w).any()
  np.testing.assert_array_equal(new["dense"]["kernel"].w, p["dense"]["kernel"].w)
  np.testing.assert_array_equal(new["dense"]["bias"], p["dense"]["bias"])
  ref_new = optax.apply_updates(trainable, ref_updates)
  np.testing.assert_allclose(new["head"]["kernel"], ref_new["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["kernel"].a, ref_new["dense"]["kernel"].a, rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["kernel"].b, ref_new["dense"]["kernel"].b, rtol=1e-6)
  assert np.asarray(new["dense"]["kernel"].b).any()


def test_optimizer_errors():
  with pytest.raises(ValueError, match=r"bias must be one of"):
    lora_fn.optimizer(optax.sgd(1.0), _wrapped(), bias="lora")
  with pytest.raises(
    TypeError,
    match=r"tx must be an optax.GradientTransformation \(a function that makes one: call it, "
    r"e.g. optax.adam\(1e-3\)\); got: <function adam",
  ):
    lora_fn.optimizer(optax.adam, _wrapped())
  with pytest.raises(TypeError, match=r"tx must be an optax.GradientTransformation; got: 0.001"):
    lora_fn.optimizer(1e-3, _wrapped())
