"""A Flax linen Vision Transformer numerically identical to Hugging Face ``ViTModel``.

The module follows transformers' ViT exactly (pre-LayerNorm blocks, exact erf GELU, qkv bias,
CLS prepended before *all* ``1 + N`` position embeddings are added) so that a converted Hugging Face
checkpoint (see ``hf_vit.py``) reproduces ``ViTModel(...).last_hidden_state``. Attention projections
are ``nn.DenseGeneral`` with per-head kernel layouts so LoRA can target them without reshapes.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

PRESETS: dict[str, dict] = {
  "B/16": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16),
  "S/16": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536, patch_size=16),
  "Ti/16": dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768, patch_size=16),
}

# transformers initialises embeddings and weights with this standard deviation.
_INIT_STD = 0.02


class Block(nn.Module):
  """One pre-LayerNorm encoder block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

  Attributes:
    hidden_size: Token width.
    num_heads: Attention heads; ``hidden_size`` must divide evenly.
    mlp_dim: Width of the MLP hidden layer.
    layer_norm_eps: LayerNorm epsilon.
    dtype: Compute dtype.
  """

  hidden_size: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  dtype: Any = jnp.float32

  def _attention(self, x: jnp.ndarray) -> jnp.ndarray:
    """Multi-head self-attention with a float32 softmax."""
    head_dim = self.hidden_size // self.num_heads
    proj = lambda name: nn.DenseGeneral(
      features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype, name=name
    )
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # (b, t, h, hd)
    # Scores and softmax in float32 so bf16 compute does not lose attention precision.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    probs = nn.softmax(scores, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return nn.DenseGeneral(features=self.hidden_size, axis=(-2, -1), dtype=self.dtype, name="out")(
      ctx
    )

  def _mlp(self, x: jnp.ndarray) -> jnp.ndarray:
    """Two dense layers with exact (erf) GELU, as transformers' ``hidden_act="gelu"``."""
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="mlp_out")(x)

  @nn.compact
  def __call__(self, x: jnp.ndarray, _: Any = None) -> tuple[jnp.ndarray, None]:
    """Applies the block.

    Args:
      x: Tokens ``(batch, tokens, hidden)``.
      _: Unused per-layer input; present so the block can be ``nn.scan``-ned.

    Returns:
      ``(tokens, None)``: the scan carry and an empty per-layer output.
    """
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + self._attention(ln("ln_before")(x))
    x = x + self._mlp(ln("ln_after")(x))
    return x, None


class ViT(nn.Module):
  """Vision Transformer matching Hugging Face ``ViTModel`` / ``ViTForImageClassification``.

  Attributes:
    num_classes: Classifier outputs.
    patch_size: Square patch side in pixels.
    hidden_size: Token width.
    num_layers: Encoder blocks.
    num_heads: Attention heads.
    mlp_dim: MLP hidden width.
    layer_norm_eps: LayerNorm epsilon (transformers' ViT uses 1e-12).
    dtype: Compute dtype; parameters stay float32.
    scan_layers: Run the blocks with ``nn.scan``; parameters then live under ``layers`` with a
      leading layer axis instead of ``layer_0``, ``layer_1``, ...
    remat: Rematerialise each block in the backward pass to save activation memory.
  """

  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self) -> None:
    # A zero head is the usual fresh-classifier init; it starts every class at equal logits.
    self.head = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      name="head",
    )

  def _embed(self, images: jnp.ndarray) -> jnp.ndarray:
    """Patchifies, prepends CLS, then adds all ``1 + N`` position embeddings (the HF order)."""
    p = self.patch_size
    x = nn.Conv(
      self.hidden_size,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      name="patch_embed",
    )(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    init = nn.initializers.normal(_INIT_STD)
    cls = self.param("cls", init, (1, 1, d))
    pos = self.param("pos_embed", init, (1, 1 + h * w, d))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)

  def _encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """Runs the encoder blocks, scanned or unrolled."""
    block_cls = Block
    if self.remat:
      # Under scan, CSE prevention is unnecessary and only costs speed.
      block_cls = nn.remat(Block, prevent_cse=not self.scan_layers)
    kwargs = dict(
      hidden_size=self.hidden_size,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )
    if self.scan_layers:
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.num_layers,
      )
      x, _ = stack(**kwargs, name="layers")(x, None)
      return x
    for i in range(self.num_layers):
      x, _ = block_cls(**kwargs, name=f"layer_{i}")(x, None)
    return x

  @nn.compact
  def features(self, images: jnp.ndarray) -> jnp.ndarray:
    """Final-LayerNorm'ed tokens, equal to HF ``ViTModel(...).last_hidden_state``.

    Args:
      images: ``(batch, H, W, 3)`` NHWC, scaled to [-1, 1].

    Returns:
      ``(batch, 1 + num_patches, hidden_size)`` in the compute dtype; token 0 is CLS.
    """
    x = self._encode(self._embed(images))
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_ln")(x)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Classifies images from the CLS token, as ``ViTForImageClassification``.

    Args:
      images: ``(batch, H, W, 3)`` NHWC, scaled to [-1, 1].

    Returns:
      Float32 logits ``(batch, num_classes)``.
    """
    # Float32 logits keep the softmax cross-entropy stable under bf16 compute.
    return self.head(self.features(images)[:, 0]).astype(jnp.float32)


def vit(name: str, num_classes: int, **overrides: Any) -> ViT:
  """Builds a ``ViT`` from a preset.

  Args:
    name: A key of ``PRESETS``, e.g. ``"B/16"``.
    num_classes: Classifier outputs.
    **overrides: Any other ``ViT`` field (``dtype``, ``scan_layers``, ...), overriding the preset.

  Returns:
    The configured module.

  Raises:
    ValueError: If ``name`` is not a preset.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown ViT preset {name!r}; choose one of {sorted(PRESETS)}")
  return ViT(num_classes=num_classes, **{**PRESETS[name], **overrides})
