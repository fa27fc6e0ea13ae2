"""Tests for the Flax ViT and the Hugging Face checkpoint loader in ``train/``."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_vit import convert_hf_vit, load_hf_vit, stack_layers
from vit import ViT, vit

_INTEROP = "interop extra not installed: pip install -e '.[interop]'"
HIDDEN, LAYERS, HEADS, MLP, IMAGE, PATCH = 32, 2, 4, 37, 32, 8
TINY = dict(patch_size=PATCH, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, mlp_dim=MLP)


def _hf_classes():
  torch = pytest.importorskip("torch", reason=_INTEROP)
  transformers = pytest.importorskip("transformers", reason=_INTEROP)
  return torch, transformers


def _perturbed(torch, model):
  """Moves every weight (LayerNorm scales and all biases included) off its init value."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _hf_model(torch, transformers, cls_name: str = "ViTModel"):
  torch.manual_seed(0)
  config = transformers.ViTConfig(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=MLP,
    image_size=IMAGE,
    patch_size=PATCH,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
  )
  return _perturbed(torch, getattr(transformers, cls_name)(config))


def _images(batch: int = 2) -> np.ndarray:
  return np.random.default_rng(0).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)


def _reference(torch, hf_vit_model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = hf_vit_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.last_hidden_state.numpy()


def _assert_close(ours, ref, tol: float = 1e-5) -> None:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
  assert rel < tol, rel


def _features(model: ViT, variables: dict, images: np.ndarray) -> jax.Array:
  return jax.jit(lambda v, x: model.apply(v, x, method=ViT.features))(variables, images)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A saved tiny ``ViTModel`` and its reference features on ``_images()``."""
  torch, transformers = _hf_classes()
  model = _hf_model(torch, transformers)
  path = tmp_path_factory.mktemp("hf_vit")
  model.save_pretrained(str(path), safe_serialization=True)
  return path, _reference(torch, model, _images())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parity_with_transformers(hf_dir, scan_layers):
  path, ref = hf_dir
  model, variables = load_hf_vit(
    str(path), num_classes=5, key=jax.random.key(0), scan_layers=scan_layers
  )
  assert model.scan_layers == scan_layers
  assert ("layers" in variables["params"]) == scan_layers
  _assert_close(_features(model, variables, _images()), ref)
  head = variables["params"]["head"]
  assert not np.any(head["kernel"]) and not np.any(head["bias"])
  assert head["kernel"].shape == (HIDDEN, 5)


def test_load_from_safetensors_file(hf_dir):
  path, ref = hf_dir
  model, variables = load_hf_vit(
    str(path / "model.safetensors"), num_classes=3, key=jax.random.key(0)
  )
  _assert_close(_features(model, variables, _images()), ref)


def test_load_classification_checkpoint(tmp_path):
  torch, transformers = _hf_classes()
  classifier = _hf_model(torch, transformers, "ViTForImageClassification")
  classifier.save_pretrained(str(tmp_path), safe_serialization=True)
  model, variables = load_hf_vit(str(tmp_path), num_classes=7, key=jax.random.key(0))
  assert variables["params"]["head"]["kernel"].shape == (HIDDEN, 7)
  _assert_close(
    _features(model, variables, _images()), _reference(torch, classifier.vit, _images())
  )


def _fake_state() -> dict[str, np.ndarray]:
  """A random checkpoint with every key ``convert_hf_vit`` expects (one layer)."""
  rng = np.random.default_rng(0)
  d, m, n = HIDDEN, MLP, (IMAGE // PATCH) ** 2
  shapes = {
    "embeddings.cls_token": (1, 1, d),
    "embeddings.position_embeddings": (1, 1 + n, d),
    "embeddings.patch_embeddings.projection.weight": (d, 3, PATCH, PATCH),
    "embeddings.patch_embeddings.projection.bias": (d,),
    "layernorm.weight": (d,),
    "layernorm.bias": (d,),
  }
  layer = "encoder.layer.0."
  for name in ("query", "key", "value"):
    shapes[f"{layer}attention.attention.{name}.weight"] = (d, d)
    shapes[f"{layer}attention.attention.{name}.bias"] = (d,)
  shapes[f"{layer}attention.output.dense.weight"] = (d, d)
  shapes[f"{layer}attention.output.dense.bias"] = (d,)
  shapes[f"{layer}intermediate.dense.weight"] = (m, d)
  shapes[f"{layer}intermediate.dense.bias"] = (m,)
  shapes[f"{layer}output.dense.weight"] = (d, m)
  shapes[f"{layer}output.dense.bias"] = (d,)
  for name in ("layernorm_before", "layernorm_after"):
    shapes[f"{layer}{name}.weight"] = (d,)
    shapes[f"{layer}{name}.bias"] = (d,)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_convert_layouts_and_ignored_keys():
  state = _fake_state()
  state["pooler.dense.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
  params = convert_hf_vit(state, num_layers=1, num_heads=HEADS)
  layer = params["layer_0"]
  assert layer["query"]["kernel"].shape == (HIDDEN, HEADS, HIDDEN // HEADS)
  assert layer["out"]["kernel"].shape == (HEADS, HIDDEN // HEADS, HIDDEN)
  assert params["patch_embed"]["kernel"].shape == (PATCH, PATCH, 3, HIDDEN)
  np.testing.assert_array_equal(
    layer["ln_after"]["scale"], state["encoder.layer.0.layernorm_after.weight"]
  )


def test_convert_missing_key():
  state = _fake_state()
  del state["encoder.layer.0.attention.attention.value.bias"]
  with pytest.raises(
    ValueError, match=r"missing key .*layer\.0\.attention\.attention\.value\.bias"
  ):
    convert_hf_vit(state, num_layers=1, num_heads=HEADS)


def test_convert_missing_layer_names_prefixed_key():
  state = {f"vit.{k}": v for k, v in _fake_state().items()}
  with pytest.raises(ValueError, match=r"missing key 'vit\.encoder\.layer\.1\."):
    convert_hf_vit(state, num_layers=2, num_heads=HEADS)


def test_convert_unexpected_key():
  state = _fake_state()
  state["encoder.layer.0.attention.attention.rotary.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"unexpected key .*attention\.rotary\.weight"):
    convert_hf_vit(state, num_layers=1, num_heads=HEADS)


def test_hub_unreachable_is_runtime_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RuntimeError, match=r"(?s)hub.*--config\.model\.source"):
    load_hf_vit("some-org/some-model", num_classes=2, key=jax.random.key(0))


def test_missing_local_path_is_not_a_hub_lookup(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_hf_vit(str(tmp_path / "nope" / "deeper"), num_classes=2, key=jax.random.key(0))


def _random_params(model: ViT, images: np.ndarray) -> dict:
  """Random params of ``model``'s shapes; cheaper than compiling ``model.init`` on 2 CPU cores."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)


def test_scan_matches_unrolled():
  images = _images()
  unrolled = ViT(num_classes=3, **TINY)
  params = _random_params(unrolled, images)
  scanned = ViT(num_classes=3, scan_layers=True, remat=True, **TINY)
  stacked = stack_layers(params, LAYERS)
  assert jax.tree.structure(stacked) == jax.tree.structure(_random_params(scanned, images))
  ref = jax.jit(unrolled.apply)({"params": params}, images)
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, images), ref, atol=1e-5)


def test_kernel_layouts():
  params = jax.eval_shape(ViT(num_classes=3, **TINY).init, jax.random.key(0), _images())["params"]
  head_dim = HIDDEN // HEADS
  assert params["layer_0"]["query"]["kernel"].shape == (HIDDEN, HEADS, head_dim)
  assert params["layer_0"]["out"]["kernel"].shape == (HEADS, head_dim, HIDDEN)
  assert params["pos_embed"].shape == (1, 1 + (IMAGE // PATCH) ** 2, HIDDEN)
  assert set(params) == {
    "cls",
    "pos_embed",
    "patch_embed",
    "layer_0",
    "layer_1",
    "final_ln",
    "head",
  }


def test_presets():
  model = vit("S/16", 10, scan_layers=True)
  assert (model.hidden_size, model.num_heads, model.mlp_dim, model.patch_size) == (384, 6, 1536, 16)
  assert model.scan_layers
  with pytest.raises(ValueError, match="unknown ViT preset"):
    vit("X/1", 10)


def test_bfloat16_compute_keeps_float32_params():
  model = ViT(num_classes=3, dtype=jnp.bfloat16, **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), _images())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert jax.eval_shape(model.apply, variables, _images()).dtype == jnp.float32


def test_fresh_head_is_zero():
  # Initialising through the head alone avoids compiling the whole encoder's init.
  tokens = np.ones((1, HIDDEN), np.float32)
  head = ViT(num_classes=3, **TINY).init(jax.random.key(0), tokens, method=lambda m, t: m.head(t))
  assert set(head["params"]) == {"head"}
  assert not np.any(head["params"]["head"]["kernel"]) and not np.any(head["params"]["head"]["bias"])
