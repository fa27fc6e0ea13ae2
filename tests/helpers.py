"""Shared test helpers: an explicit LoRA formula, tree-aware assertions, a torch model's twin."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lorax_fn as lora_fn


def explicit_delta(leaf: lora_fn.LoraLeaf) -> np.ndarray:
  """``(alpha/rank)·B·A`` in the kernel's axis order, by plain numpy reshapes and a matmul."""
  roles, shape = leaf.roles, leaf.shape
  stack = [i for i, r in enumerate(roles) if r == "stack"]
  ins = [i for i, r in enumerate(roles) if r == "in"]
  outs = [i for i, r in enumerate(roles) if r == "out"]
  s = math.prod(shape[i] for i in stack)
  a = np.asarray(leaf.a, np.float64).reshape(s, leaf.rank, -1).transpose(0, 2, 1)
  b = np.asarray(leaf.b, np.float64).reshape(s, leaf.rank, -1)
  delta = (leaf.alpha / leaf.rank) * (a @ b)  # (stack, in, out)
  delta = delta.reshape([shape[i] for i in stack + ins + outs])
  return np.transpose(delta, np.argsort(stack + ins + outs))


def explicit_merge(params):
  def one(x):
    if lora_fn.is_lora(x):
      return (np.asarray(x.w, np.float64) + explicit_delta(x)).astype(np.asarray(x.w).dtype)
    return x

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def randomize(params, key, scale=0.5):
  """Gives every LoRA leaf random non-zero A and B."""
  leaves = [x for x in jax.tree.leaves(params, is_leaf=lora_fn.is_lora) if lora_fn.is_lora(x)]
  keys = iter(jax.random.split(key, 2 * len(leaves)))

  def one(x):
    if not lora_fn.is_lora(x):
      return x
    return dataclasses.replace(
      x,
      a=scale * jax.random.normal(next(keys), x.a.shape, x.a.dtype),
      b=scale * jax.random.normal(next(keys), x.b.shape, x.b.dtype),
    )

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def randomize_np(params, seed, scale=0.5):
  """:func:`randomize` with numpy's generator: nothing to compile, for tests that only compare."""
  rng = np.random.default_rng(seed)

  def one(x):
    if not lora_fn.is_lora(x):
      return x
    a, b = (scale * rng.standard_normal(np.shape(f)) for f in (x.a, x.b))
    return dataclasses.replace(x, a=np.asarray(a, x.a.dtype), b=np.asarray(b, x.b.dtype))

  return jax.tree.map(one, params, is_leaf=lora_fn.is_lora)


def assert_trees_close(actual, expected, rtol=1e-5, atol=0.0):
  """Relative closeness per leaf, relative to the leaf's largest magnitude; names the path."""
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e, strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
    err = np.abs(a - e).max() if a.size else 0.0
    bound = rtol * max(np.abs(e).max() if e.size else 0.0, 1e-30) + atol
    assert err <= bound, f"{jax.tree_util.keystr(path)}: max error {err:.3g} > {bound:.3g}"


def assert_trees_equal(actual, expected):
  flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e)
  for (path, a), e in zip(flat_a, flat_e, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


def all_eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the sub-jaxprs in its parameters (scan, cond, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from all_eqns(inner)


# ------------------------------------------------------------------------------------------
# A torch model and its Flax twin (test_peft, test_dora): an Embedding, a Conv2d and two
# Linear layers of pairwise-distinct sizes. torch is imported only by the tests that use it.
# ------------------------------------------------------------------------------------------

TWIN_SIZES = (11, 6, 13, 5)
"""``(vocab, embedding dim = conv channels, fc1 width, outputs)``."""
TWIN_MODULES = {"embed": "embed", "conv": "conv", "fc1": "fc1", "fc2": "fc2"}
"""Our module paths to the torch model's module names."""


class Twin(nn.Module):
  """The Flax twin of :func:`torch_net`'s model; images NHWC."""

  @nn.compact
  def __call__(self, ids, img):
    vocab, d, hid, out = TWIN_SIZES
    t = nn.Embed(vocab, d, name="embed")(ids).mean(1)
    t = t + nn.Conv(d, (3, 3), padding=1, name="conv")(img).mean((1, 2))
    return nn.Dense(out, name="fc2")(nn.gelu(nn.Dense(hid, name="fc1")(t), approximate=False))


@functools.cache
def _torch_net_class():
  import torch

  vocab, d, hid, out = TWIN_SIZES

  class TorchNet(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(vocab, d)
      self.conv = torch.nn.Conv2d(3, d, 3, padding=1)
      self.fc1 = torch.nn.Linear(d, hid)
      self.fc2 = torch.nn.Linear(hid, out)

    def forward(self, ids, img):  # img NCHW
      t = self.embed(ids).mean(1) + self.conv(img).mean((2, 3))
      return self.fc2(torch.nn.functional.gelu(self.fc1(t)))

  return TorchNet


def torch_net(seed=0):
  """The torch model with weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
  import torch

  torch.manual_seed(seed)
  return _torch_net_class()().eval()


def twin_params(net):
  """The twin's params holding the torch model's weights."""
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  return {
    "embed": {"embedding": jnp.asarray(sd["embed.weight"])},
    "conv": {
      "kernel": jnp.asarray(sd["conv.weight"].transpose(2, 3, 1, 0)),
      "bias": jnp.asarray(sd["conv.bias"]),
    },
    "fc1": {"kernel": jnp.asarray(sd["fc1.weight"].T), "bias": jnp.asarray(sd["fc1.bias"])},
    "fc2": {"kernel": jnp.asarray(sd["fc2.weight"].T), "bias": jnp.asarray(sd["fc2.bias"])},
  }


def twin_inputs(seed=0):
  """``(ids (7, 4), images (7, 3, 9, 8) NCHW float32)``."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TWIN_SIZES[0], (7, 4))
  img = rng.normal(size=(7, 3, 9, 8)).astype(np.float32)
  return ids, img


@functools.cache
def _lora_twin():
  return lora_fn.lora(Twin().apply)  # one wrapper: its traces are cached across tests


def twin_apply(params, ids, img):
  """The twin with LoRA leaves (``lora_fn.lora``) on NCHW images, as a JAX array."""
  return _lora_twin()({"params": params}, jnp.asarray(ids), jnp.asarray(img).transpose(0, 2, 3, 1))


def torch_apply(model, ids, img):
  """A torch (or PEFT) model's outputs, without gradients, as numpy."""
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(ids), torch.as_tensor(img)).numpy()


def peft_dora_factors(model, grads=False, targets=("embed", "conv", "fc1", "fc2")):
  """``{module: (A, B, m)}`` of a PEFT DoRA model of the twin (or their gradients), in our
  layouts: A ``(r, in)`` (a Conv2d's ``(r, kh, kw, in)``), B ``(r, out)``, m ``(out,)``."""
  out = {}
  for name in targets:
    layer = getattr(model.base_model.model, name)
    if name == "embed":
      a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
      a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    a, b, m = ((x.grad if grads else x).detach().numpy().copy() for x in (a, b, m))
    if name == "conv":  # A (r, in, kh, kw) -> (r, kh, kw, in); B (out, r, 1, 1) -> (r, out)
      a, b = a.transpose(0, 2, 3, 1), b[:, :, 0, 0]
    out[name] = (a, b.T, m.reshape(-1))
  return out
