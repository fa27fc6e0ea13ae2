"""``infer_layouts`` reads axis roles off the traced function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_close, randomize

import lorax_fn as lora_fn

K = jax.random.key


class _Model(nn.Module):
  @nn.compact
  def __call__(self, ids, img):
    emb = nn.Embed(13, 6)
    x = emb(ids) + nn.Conv(6, (3, 3))(img).mean((1, 2))[:, None]
    x = nn.Einsum((6, 2, 3), "btd,dhk->bthk", name="heads")(x).reshape(x.shape[:2] + (6,))

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return h + nn.MultiHeadDotProductAttention(num_heads=2)(h), None

    x = nn.scan(
      nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=2
    )()(x, None)[0]
    return emb.attend(x)


def test_infers_every_kind():
  ids, img = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 7, 7, 3))
  params = jax.eval_shape(_Model().init, jax.random.key(0), ids, img)
  layouts = lora_fn.infer_layouts(_Model().apply, params, ids, img)
  attn = "params/ScanCheckpointLayer_0/MultiHeadDotProductAttention_0"
  assert layouts == {
    "params/Embed_0/embedding": ("in", "out"),
    "params/Conv_0/kernel": ("in", "in", "in", "out"),
    "params/heads/kernel": ("in", "out", "out"),
    f"{attn}/query/kernel": ("stack", "in", "out", "out"),
    f"{attn}/key/kernel": ("stack", "in", "out", "out"),
    f"{attn}/value/kernel": ("stack", "in", "out", "out"),
    f"{attn}/out/kernel": ("stack", "in", "in", "out"),
  }


def test_conflicting_roles_are_an_error():
  def fn(p, x):  # the same 3-D kernel contracted on axis 0 and on axis 2
    return jnp.einsum("bi,ijk->bjk", x, p["w"]).sum() + jnp.einsum("bk,ijk->bij", x, p["w"]).sum()

  with pytest.raises(ValueError, match=r"kernel at 'w' is used with conflicting axis roles"):
    lora_fn.infer_layouts(fn, {"w": jnp.ones((5, 2, 5))}, jnp.ones((3, 5)))


def test_broadcast_kernel_is_followed():
  def fn(p, x):
    return jnp.einsum("bnd,bdo->bno", x, jnp.broadcast_to(p["w"], (2, 5, 7)))

  layouts = lora_fn.infer_layouts(fn, {"w": jnp.ones((5, 7))}, jnp.ones((2, 3, 5)))
  assert layouts == {"w": ("in", "out")}


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    h = h + nn.MultiHeadDotProductAttention(num_heads=2)(h)
    return h + nn.Dense(6)(nn.gelu(nn.Dense(10)(h))), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(name="ScanBlock_0")(nn.Dense(6)(x), None)[0]


def test_layouts_of_a_variables_dict_wrap_its_params():
  # The way every Flax user calls apply: infer on {"params": p}, wrap p itself.
  model, x = _Scanned(), jax.random.normal(jax.random.key(1), (2, 5, 4))
  p = model.init(jax.random.key(0), x)["params"]
  layouts = lora_fn.infer_layouts(model.apply, {"params": p}, x)
  assert layouts["params/ScanBlock_0/Dense_0/kernel"] == ("stack", "in", "out")
  wrapped = lora_fn.wrap(p, rank=2, targets=("Dense_0", "query"), layouts=layouts, key=K(2))
  block = wrapped["ScanBlock_0"]
  assert block["Dense_0"]["kernel"].roles == ("stack", "in", "out")
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].roles == (
    "stack",
    "in",
    "out",
    "out",
  )
  assert block["Dense_0"]["kernel"].a.shape == (3, 2, 10)  # one A per layer
  trained = randomize(wrapped, K(3))
  got = lora_fn.lora(model.apply)({"params": trained}, x)
  want = model.apply({"params": lora_fn.merge(trained)}, x)
  assert_trees_close(got, want)


def test_layouts_of_a_larger_tree_still_name_a_missing_kernel():
  model, x = _Scanned(), jnp.ones((2, 5, 4))
  p = model.init(jax.random.key(0), x)["params"]
  layouts = {"params/ScanBlock_0/Dense_9/kernel": ("stack", "in", "out")}
  with pytest.raises(
    ValueError, match=r"layouts key 'params/ScanBlock_0/Dense_9/kernel' matches no parameter"
  ):
    lora_fn.wrap(p, rank=2, targets=("Dense_0",), layouts=layouts, key=K(2))


def test_layouts_are_read_through_a_custom_vjp():
  @jax.custom_vjp
  def clip_grad(w):
    return w

  clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))
  layouts = lora_fn.infer_layouts(
    lambda p, x: jnp.einsum("bi,sio->bso", x, clip_grad(p["w"])),
    {"w": jnp.ones((3, 5, 7))},
    jnp.ones((2, 5)),
  )
  assert layouts == {"w": ("out", "in", "out")}
