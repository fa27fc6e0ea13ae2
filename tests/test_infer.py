"""``infer_layouts`` reads axis roles off the traced function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lorax_fn as lora_fn


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
