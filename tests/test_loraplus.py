"""``loraplus`` against PEFT's ``create_loraplus_optimizer``: equal gradients, equal AdamW steps.

The DoRA twin of ``test_dora`` (``helpers.torch_net``: an Embedding, a Conv2d, Linear layers)
plus a fully trained head (``modules_to_save``) covers every PEFT group: A factors and the
head's kernel, B factors and magnitudes, the head's bias (no weight decay), the embedding's
adapter, and the Conv2d's magnitude, which PyTorch holds as ``(1, out, 1, 1)`` and so groups
with A.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, peft_dora_factors, torch_net, twin_params

import lorax_fn as lora_fn

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

K = jax.random.key
TARGETS = ("embed", "conv", "fc1")
LR, RATIO, EMBEDDING_LR, DECAY = 1e-2, 4.0, 3e-3, 0.1


def _peft_model():
  config = peft.LoraConfig(
    r=3, lora_alpha=5, target_modules=list(TARGETS), modules_to_save=["fc2"], use_dora=True
  )
  model = peft.get_peft_model(torch_net(), config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name and "magnitude" not in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  return model


def _head(model, grads=False):
  fc2 = model.base_model.model.fc2.modules_to_save["default"]
  w, b = ((x.grad if grads else x).detach().numpy().copy() for x in (fc2.weight, fc2.bias))
  return {"kernel": w.T, "bias": b}


def _ours(model, grads=False):
  """PEFT's trainable arrays (or their gradients) as our trainable tree."""
  tree = {name: {} for name in ("embed", "conv", "fc1")}
  for name, (a, b, m) in peft_dora_factors(model, grads, TARGETS).items():
    kernel = "embedding" if name == "embed" else "kernel"
    tree[name][kernel] = (a, b, m)  # numpy: jit takes them as they are
  tree["fc2"] = _head(model, grads)
  return tree


def _fill(train, values):
  """``train`` (split's trainable half) holding ``values`` from :func:`_ours`."""
  out = jax.tree.map(lambda x: x, train, is_leaf=lora_fn.is_lora)
  for name, leaves in values.items():
    for leaf_name, v in leaves.items():
      x = out[name][leaf_name]
      if lora_fn.is_lora(x):
        v = dataclasses.replace(x, a=v[0], b=v[1], m=v[2])
      out[name][leaf_name] = v
  return out


def test_two_adamw_steps_equal_peft_create_loraplus_optimizer():
  model = _peft_model()
  params = lora_fn.wrap(
    twin_params(torch_net()), rank=3, alpha=5.0, targets=TARGETS, dora=True, key=K(0)
  )
  train, frozen = lora_fn.split(params, trainable=("fc2",))
  train = _fill(train, _ours(model))
  opt = create_loraplus_optimizer(
    model,
    torch.optim.AdamW,
    lr=LR,
    loraplus_lr_ratio=RATIO,
    loraplus_lr_embedding=EMBEDDING_LR,
    loraplus_weight_decay=DECAY,
  )
  tx = lora_fn.optimizer(
    lora_fn.loraplus(
      optax.adamw, LR, ratio=RATIO, embedding_lr=EMBEDDING_LR, weight_decay=DECAY, eps=1e-8
    ),
    lora_fn.combine(train, frozen),
    trainable=("fc2",),
  )
  state = jax.jit(tx.init)(train)

  @jax.jit
  def step(grads, state, train):
    updates, state = tx.update(grads, state, train)
    return optax.apply_updates(train, updates), state

  rng = np.random.default_rng(0)
  for _ in range(2):
    for p in model.parameters():
      if p.requires_grad:
        p.grad = torch.as_tensor(rng.normal(size=p.shape).astype(np.float32))
    grads = _fill(train, _ours(model, grads=True))
    opt.step()
    train, state = step(grads, state, train)
  assert_trees_close(train, _fill(train, _ours(model)), rtol=1e-5)


def test_groups_and_schedules():
  base = {
    "embed": {"embedding": jnp.ones((11, 6))},
    "conv": {"kernel": jnp.ones((3, 3, 2, 5))},
    "fc": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)},
    "norm": {"scale": jnp.ones(7)},
  }
  params = lora_fn.wrap(base, rank=2, targets=("embed", "conv", "fc"), dora=True, key=K(0))
  schedule = optax.linear_schedule(0.5, 0.0, 10)
  tx = lora_fn.optimizer(
    lora_fn.loraplus(optax.sgd, schedule, ratio=3.0, embedding_lr=0.25),
    params,
    trainable=("norm",),
    bias="all",
  )
  train, _ = lora_fn.split(params, trainable=("norm",), bias="all")
  ones = jax.tree.map(lambda x: np.ones(np.shape(x), np.float32), train)
  updates, _ = jax.jit(tx.update)(ones, tx.init(train), train)
  first = lambda x: float(np.asarray(x).reshape(-1)[0])
  got = {
    "fc a": first(updates["fc"]["kernel"].a),
    "fc b": first(updates["fc"]["kernel"].b),
    "fc m": first(updates["fc"]["kernel"].m),
    "conv m": first(updates["conv"]["kernel"].m),  # (1, out, 1, 1) in PyTorch: with A
    "embed a": first(updates["embed"]["embedding"].a),
    "embed b": first(updates["embed"]["embedding"].b),
    "embed m": first(updates["embed"]["embedding"].m),  # PEFT groups it by its 1 axis
    "bias": first(updates["fc"]["bias"]),
    "scale": first(updates["norm"]["scale"]),
  }
  assert got == pytest.approx(
    {
      "fc a": -0.5,
      "fc b": -1.5,
      "fc m": -1.5,
      "conv m": -0.5,
      "embed a": -0.25,
      "embed b": -0.25,
      "embed m": -1.5,
      "bias": -1.5,
      "scale": -1.5,
    }
  )


ERRORS = [
  (
    "built",
    dict(tx_factory=optax.adam(1e-3)),
    TypeError,
    r"tx_factory must be a function that makes an optax transformation from learning_rate=, "
    r"e.g. optax.adamw \(not optax.adamw\(1e-3\)\)",
  ),
  (
    "lr",
    dict(learning_rate=0.0),
    ValueError,
    r"learning_rate must be a positive finite number or an optax schedule; got: 0.0",
  ),
  ("ratio", dict(ratio=-2), ValueError, r"ratio must be a positive finite number; got: -2"),
  ("embedding_lr", dict(embedding_lr="x"), ValueError, r"embedding_lr must be a positive"),
  (
    "decay",
    dict(weight_decay=-0.1),
    ValueError,
    r"weight_decay must be a number >= 0 \(or None\); got: -0.1",
  ),
  (
    "no_decay_arg",
    dict(weight_decay=0.1),
    TypeError,
    r"tx_factory\(learning_rate=..., weight_decay=\) failed for the lora_A group: .*"
    r"\(weight_decay=None passes none\)",
  ),
]


@pytest.mark.parametrize("name, kwargs, exc, regex", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, kwargs, exc, regex):
  kwargs = dict(tx_factory=optax.adam, learning_rate=1e-3) | kwargs
  with pytest.raises(exc, match=regex):
    lora_fn.loraplus(kwargs.pop("tx_factory"), kwargs.pop("learning_rate"), **kwargs)
