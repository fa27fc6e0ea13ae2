"""The ViT job's adapters and merged models in PyTorch: PEFT and transformers load them.

A tiny random ``ViTForImageClassification`` (pairwise-distinct sizes) is the base. Adapters
go ours -> PEFT and PEFT -> ours (under transformers 5.x and 4.x module names), the merged
export loads into transformers, and every logit agrees with ours to 1e-5.
"""

from __future__ import annotations

import dataclasses
import doctest
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import hf_vit
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from vit import ViT

import lorax_fn as lora_fn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# transformers 5.24 warns about its own deprecated name when PEFT wraps one of its models.
pytestmark = pytest.mark.filterwarnings(
  "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

K = jax.random.key
HIDDEN, HEADS, LAYERS, MLP, PATCH, IMAGE, CLASSES = 12, 2, 3, 17, 4, 8, 7
TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A saved tiny ``ViTForImageClassification``, every weight moved off its init value."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=MLP,
    image_size=IMAGE,
    patch_size=PATCH,
    num_labels=CLASSES,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
  )
  model = transformers.ViTForImageClassification(config)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  path = tmp_path_factory.mktemp("hf_vit")
  model.save_pretrained(str(path))
  return path


def _images() -> np.ndarray:
  return np.random.default_rng(0).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)


def _base(hf_dir) -> transformers.ViTForImageClassification:
  return transformers.ViTForImageClassification.from_pretrained(str(hf_dir)).eval()


def _theirs(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():  # PyTorch takes NCHW
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()


def _ours(model: ViT, variables, images: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(lora_fn.lora(model.apply))(variables, images))


def _close(actual, expected) -> None:
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@functools.cache  # shared by the tests of one case; nothing mutates it
def _trained(hf_dir, scan_layers: bool, rslora: bool):
  """Our model on the checkpoint, LoRA on every attention and MLP kernel, factors and head
  random and non-zero; ranks and alphas differ between kernels."""
  model, variables = hf_vit.load_hf_vit(
    str(hf_dir), num_classes=CLASSES, key=K(0), scan_layers=scan_layers
  )
  layouts = lora_fn.infer_layouts(model.apply, variables, _images())
  variables = lora_fn.wrap(
    variables,
    rank=5,
    alpha=10.0,
    targets=TARGETS,
    rank_pattern={"mlp_in": 8},
    alpha_pattern={"out": 3.0},
    rslora=rslora,
    layouts=layouts,
    key=K(1),
  )
  # numpy, not jax.random: an eager jax.random call compiles once per shape (seconds here).
  rng = np.random.default_rng(2)
  normal = lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32)
  # Small factors keep the model well conditioned: float32 itself then agrees to 1e-6.
  variables = jax.tree.map(
    lambda x: dataclasses.replace(x, a=normal(x.a), b=normal(x.b)) if lora_fn.is_lora(x) else x,
    variables,
    is_leaf=lora_fn.is_lora,
  )
  variables["params"]["head"] = jax.tree.map(normal, variables["params"]["head"])
  return model, variables


def test_peft_modules_name_the_torch_modules(hf_dir):
  """First names are modules of transformers 5's model; the others, modules on disk (4.x)."""
  in_memory = {n for n, _ in _base(hf_dir).named_modules()}
  on_disk = {k.rpartition(".")[0] for k in load_file(str(hf_dir / "model.safetensors"))}
  model = ViT(num_classes=CLASSES, num_layers=LAYERS, num_heads=HEADS, hidden_size=HIDDEN)
  modules = hf_vit.peft_modules(model)
  assert set(modules) == {"patch_embed", "final_ln", "head"} | {
    f"layer_{i}/{m}" for i in range(LAYERS) for m in (*TARGETS, "ln_before", "ln_after")
  }
  assert {names[0] for names in modules.values()} <= in_memory
  assert {names[-1] for names in modules.values()} <= on_disk
  assert modules["layer_2/out"] == (
    "vit.layers.2.attention.o_proj",
    "vit.encoder.layer.2.attention.output.dense",
  )
  assert hf_vit.peft_modules(model, prefix="params/")["params/head"] == ("classifier",)
  scanned = hf_vit.peft_modules(model.clone(scan_layers=True), prefix="params")
  per_layer = {
    f"params/layer_{i}/{k.split('/')[-1]}": tuple(n.format(i) for n in names)
    for k, names in scanned.items()
    if k.startswith("params/layers/")
    for i in range(LAYERS)
  }
  assert per_layer == {f"params/{k}": v for k, v in modules.items() if k.startswith("layer_")}


def test_peft_modules_errors():
  with pytest.raises(TypeError, match=r"model must be a vit\.ViT; got: dict"):
    hf_vit.peft_modules({"params": {}})
  with pytest.raises(TypeError, match=r"prefix must be a str such as 'params'; got: 1"):
    hf_vit.peft_modules(ViT(num_classes=2), prefix=1)


def test_hf_vit_docstring_examples():
  assert doctest.testmod(hf_vit).failed == 0


CASES = pytest.mark.parametrize(
  ("scan_layers", "rslora"), [(False, False), (True, True)], ids=["unrolled", "scanned_rslora"]
)


@CASES
def test_ours_to_peft(hf_dir, tmp_path, scan_layers, rslora):
  model, variables = _trained(hf_dir, scan_layers, rslora)
  modules = hf_vit.peft_modules(model, prefix="params")
  lora_fn.save_peft(tmp_path / "a", variables, modules=modules, trainable=("head",))
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  # Full names: a last name would make PEFT adapt every module of that name.
  assert config["target_modules"] == sorted(
    f"vit.layers.{i}.{m}"
    for i in range(model.num_layers)
    for m in (
      "attention.k_proj",
      "attention.o_proj",
      "attention.q_proj",
      "attention.v_proj",
      "mlp.fc1",
      "mlp.fc2",
    )
  )
  assert (config["rank_pattern"], config["alpha_pattern"]) == ({"fc1": 8}, {"o_proj": 3})
  assert config["modules_to_save"] == ["classifier"] and config["use_rslora"] is rslora
  theirs = peft.PeftModel.from_pretrained(_base(hf_dir), str(tmp_path / "a")).eval()
  _close(_theirs(theirs, _images()), _ours(model, variables, _images()))


def _peft_adapter(hf_dir, path):
  """PEFT's own adapter on the checkpoint: q, v, fc1 (another rank), the classifier trained."""
  model = peft.get_peft_model(
    _base(hf_dir),
    peft.LoraConfig(
      r=4,
      lora_alpha=8,
      target_modules=["q_proj", "v_proj", "fc1"],
      rank_pattern={"fc1": 3},
      modules_to_save=["classifier"],
    ),
  )
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(str(path))
  return _theirs(model.eval(), _images())


_TO_4X = {
  "attention.q_proj": "attention.attention.query",
  "attention.v_proj": "attention.attention.value",
  "mlp.fc1": "intermediate.dense",
}


def _as_4x(src, dst) -> None:
  """The adapter under transformers 4.x names (``vit.encoder.layer.0.attention.attention...``)."""
  tensors = load_file(str(src / "adapter_model.safetensors"))
  pattern = re.compile(r"vit\.layers\.(\d+)\.(attention\.q_proj|attention\.v_proj|mlp\.fc1)\.")
  rename = lambda m: f"vit.encoder.layer.{m[1]}.{_TO_4X[m[2]]}."
  os.makedirs(dst)
  renamed = {pattern.sub(rename, k): v for k, v in tensors.items()}
  save_file(renamed, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
  config = json.loads((src / "adapter_config.json").read_text())
  config["target_modules"] = ["query", "value", "intermediate.dense"]
  config["rank_pattern"] = {"intermediate.dense": 3}
  (dst / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("names", "scan_layers"), [("5.x", False), ("4.x", False), ("5.x", True)])
def test_peft_to_ours(hf_dir, tmp_path, names, scan_layers):
  theirs = _peft_adapter(hf_dir, tmp_path / "5.x")
  if names == "4.x":
    _as_4x(tmp_path / "5.x", tmp_path / "4.x")
    assert "base_model.model.vit.encoder.layer.2.attention.attention.query.lora_A.weight" in (
      load_file(str(tmp_path / "4.x" / "adapter_model.safetensors"))
    )
  model, variables = hf_vit.load_hf_vit(
    str(hf_dir), num_classes=CLASSES, key=K(0), scan_layers=scan_layers
  )
  # A scanned model's stacked Dense kernels are 3-D: their layout is inferred, not guessed.
  layouts = lora_fn.infer_layouts(model.apply, variables, _images()) if scan_layers else None
  params = lora_fn.load_peft(
    tmp_path / names, variables["params"], modules=hf_vit.peft_modules(model), layouts=layouts
  )
  mlp_in = params["layers" if scan_layers else "layer_1"]["mlp_in"]["kernel"]
  assert (mlp_in.rank, mlp_in.alpha) == (3, 8.0)
  _close(_ours(model, {"params": params}, _images()), theirs)


@CASES
def test_merged_export_loads_into_transformers(hf_dir, tmp_path, scan_layers, rslora):
  model, variables = _trained(hf_dir, scan_layers, rslora)
  names = [f"class_{c}" for c in "abcdefg"]
  hf_vit.save_hf_vit(tmp_path / "m", model, variables["params"], names)
  merged, info = transformers.ViTForImageClassification.from_pretrained(
    str(tmp_path / "m"), output_loading_info=True
  )
  assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched key
  assert merged.config.id2label[6] == "class_g" and merged.config.label2id["class_a"] == 0
  ours = jax.jit(model.apply)({"params": lora_fn.merge(variables["params"])}, _images())
  _close(_theirs(merged.eval(), _images()), np.asarray(ours))


def test_export_then_load_is_the_identity(hf_dir, tmp_path):
  model, variables = hf_vit.load_hf_vit(str(hf_dir), num_classes=CLASSES, key=K(0))
  hf_vit.save_hf_vit(tmp_path / "m", model, variables["params"], list("abcdefg"))
  again = hf_vit.load_hf_vit(str(tmp_path / "m"), num_classes=CLASSES, key=K(0))[1]
  variables["params"].pop("head"), again["params"].pop("head")  # loading makes a fresh head
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  original, written = (load_file(str(d / "model.safetensors")) for d in (hf_dir, tmp_path / "m"))
  assert sorted(written) == sorted(original)
  np.testing.assert_array_equal(written["classifier.weight"], np.zeros((CLASSES, HIDDEN)))


def test_save_hf_vit_errors(hf_dir, tmp_path):
  model, variables = hf_vit.load_hf_vit(str(hf_dir), num_classes=CLASSES, key=K(0))
  params = variables["params"]
  with pytest.raises(ValueError, match=r"class_names must be 7 distinct names, one per output"):
    hf_vit.save_hf_vit(tmp_path / "m", model, params, ["a", "b"])
  with pytest.raises(ValueError, match=r"class_names must be 7 distinct names.*got: \['a', 'a'"):
    hf_vit.save_hf_vit(tmp_path / "m", model, params, ["a"] * CLASSES)
  stacked = hf_vit.stack_layers(params, LAYERS)
  with pytest.raises(
    ValueError,
    match=r"params do not fit the unrolled ViT of 3 layers: missing \['layer_0/key/bias'.*"
    r"unexpected \['layers/key/bias'",
  ):
    hf_vit.save_hf_vit(tmp_path / "m", model, stacked, list("abcdefg"))
  with pytest.raises(TypeError, match=r"model must be a vit\.ViT; got: str"):
    hf_vit.save_hf_vit(tmp_path / "m", "vit", params, list("abcdefg"))
  hf_vit.save_hf_vit(tmp_path / "m", model, params, list("abcdefg"))
  with pytest.raises(ValueError, match=r"already exists; pass overwrite=True"):
    hf_vit.save_hf_vit(tmp_path / "m", model, params, list("abcdefg"))
  hf_vit.save_hf_vit(tmp_path / "m", model, params, list("abcdefg"), overwrite=True)


def test_modules_of_another_model_are_an_error(hf_dir, tmp_path):
  """The scanned model's params with the unrolled model's names (or the other way round)."""
  scanned, variables = _trained(hf_dir, True, True)
  unrolled = scanned.clone(scan_layers=False)
  with pytest.raises(
    ValueError,
    match=r"modules key 'params/layer_0/query' is not a module path of params; nearest: "
    r"\['params/layers/query'.*scanned vs unrolled model",
  ):
    lora_fn.save_peft(
      tmp_path / "a", variables, modules=hf_vit.peft_modules(unrolled, prefix="params")
    )
  _peft_adapter(hf_dir, tmp_path / "p")
  with pytest.raises(ValueError, match=r"modules key 'layer_0/query' is not a module path"):
    lora_fn.load_peft(tmp_path / "p", variables["params"], modules=hf_vit.peft_modules(unrolled))
