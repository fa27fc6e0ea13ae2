"""Three adapters on one base, served together: a different adapter per example, then mixes.

The base is a small MLP trained on scikit-learn's handwritten digits. Three tasks show the
same digits transformed (rotated a quarter turn, shifted two pixels, mirrored); a rank-4
adapter learns each, the base frozen. Then one batch mixing the three tasks runs with a
different adapter per example (``adapter_ids``) and gets exactly the accuracy of each adapter
alone; finally ``weighted_adapter`` mixes the three into one (``cat``: exactly their
weighted sum; ``svd``: its best rank-4 fit) and the mix is scored on every task. The
tasks pull the base in different directions, so one mixed adapter serves none of them
well: serving them side by side (``adapter_ids``) keeps each one's accuracy, mixing does not.

    python examples/many_adapters.py [--steps 300]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import lorax_fn as lora_fn

TASKS = {
  "rotated": lambda im: np.rot90(im, 1, axes=(1, 2)),
  "shifted": lambda im: np.roll(im, 2, axis=2),
  "mirrored": lambda im: im[:, :, ::-1],
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.gelu(nn.Dense(128, name=f"hidden{i}")(x))
    return nn.Dense(10, name="head")(x)


def _data(seed: int = 0):
  digits = load_digits()
  order = np.random.default_rng(seed).permutation(len(digits.target))
  images, labels = digits.images[order], digits.target[order]
  cut = int(0.75 * len(labels))
  return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def _flat(images: np.ndarray) -> jax.Array:
  return jnp.asarray(images.reshape(len(images), -1) / 16.0, jnp.float32)


def _train(loss_of, params, tx, steps):
  """``steps`` of ``tx`` on ``loss_of``; with LoRA leaves, gradients for the adapters only."""
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    trainable, frozen = lora_fn.split(params) if _wrapped(params) else (params, None)
    rebuild = (lambda t: lora_fn.combine(t, frozen)) if frozen is not None else (lambda t: t)
    grads = jax.grad(lambda t: loss_of(rebuild(t)))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return rebuild(optax.apply_updates(trainable, updates)), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def _wrapped(params) -> bool:
  return any(lora_fn.is_lora(x) for x in jax.tree.leaves(params, is_leaf=lora_fn.is_lora))


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(steps: int = 300) -> dict[str, dict[str, float]]:
  model = MLP()
  (train_im, train_y), (test_im, test_y) = _data()
  base = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
  x, y = _flat(train_im), jnp.asarray(train_y)
  base = _train(lambda p: _xent(model.apply({"params": p}, x), y), base, optax.adam(3e-3), steps)
  apply = lora_fn.lora(lambda p, x: model.apply({"params": p}, x))

  # One adapter per task; only its factors train (split/combine: no gradient for the base).
  adapters = []
  for i, transform in enumerate(TASKS.values()):
    tx_, ty = _flat(transform(train_im)), jnp.asarray(train_y)
    wrapped = lora_fn.wrap(
      base, rank=4, alpha=8.0, targets=("hidden0", "hidden1", "head"), key=jax.random.key(10 + i)
    )
    tx = lora_fn.optimizer(optax.adam(1e-2), wrapped)
    loss_of = lambda p, tx_=tx_, ty=ty: _xent(apply(p, tx_), ty)
    adapters.append(_train(loss_of, wrapped, tx, steps))

  def accuracy(logits, labels):
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))

  tests = {name: _flat(t(test_im)) for name, t in TASKS.items()}
  labels = jnp.asarray(test_y)
  results = {
    "base": {n: accuracy(model.apply({"params": base}, t), labels) for n, t in tests.items()}
  }
  for (name, t), adapter in zip(tests.items(), adapters, strict=True):
    results.setdefault("alone", {})[name] = accuracy(apply(adapter, t), labels)

  # One mixed batch: every test example of every task, each with its task's adapter.
  stacked = lora_fn.stack_adapters(adapters)
  batch = jnp.concatenate(list(tests.values()))
  ids = jnp.repeat(jnp.arange(len(TASKS), dtype=jnp.int32), len(labels))
  logits = jax.jit(lambda p, x, i: apply(p, x, adapter_ids=i))(stacked, batch, ids)
  for k, name in enumerate(TASKS):
    results.setdefault("mixed batch", {})[name] = accuracy(
      logits[k * len(labels) : (k + 1) * len(labels)], labels
    )

  # One adapter from the three: their weighted sum (cat), and its best rank-4 fit (svd).
  for method in ("cat", "svd"):
    mix = lora_fn.weighted_adapter(
      adapters, [1 / 3] * 3, method=method, rank=4 if method == "svd" else None
    )
    results[f"{method} mix"] = {n: accuracy(apply(mix, t), labels) for n, t in tests.items()}

  print(f"{'accuracy':14s}" + "".join(f"{n:>10s}" for n in TASKS))
  for row, values in results.items():
    print(f"{row:14s}" + "".join(f"{values[n]:10.3f}" for n in TASKS))
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  main(parser.parse_args().steps)
