"""``save_peft`` / ``load_peft`` against PEFT itself: a torch model and its Flax twin agree.

The twin has an Embedding, a Conv2d and Linear layers (pairwise-distinct sizes), a head that
PEFT trains fully (``modules_to_save``) and per-module ranks; adapters go both ways, and the
PyTorch logits must equal ours to 1e-5.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  TWIN_MODULES,
  TWIN_SIZES,
  Twin,
  randomize,
  torch_apply,
  torch_net,
  twin_apply,
  twin_inputs,
  twin_params,
)

import lorax_fn as lora_fn

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

K = jax.random.key
VOCAB, D, HID, OUT = TWIN_SIZES
MODULES = TWIN_MODULES


def test_twin_matches_the_torch_model():
  net = torch_net()
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    np.asarray(Twin().apply({"params": twin_params(net)}, ids, img.transpose(0, 2, 3, 1))),
    torch_apply(net, ids, img),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("rslora", [False, True])
def test_ours_to_peft(tmp_path, rslora):
  net = torch_net()
  params = lora_fn.wrap(
    twin_params(net),
    rank=4,
    alpha=8.0,
    targets=("embed", "conv", "fc1"),
    rank_pattern={"conv": 2},
    alpha_pattern={"fc1": 3.0},
    rslora=rslora,
    key=K(0),
  )
  params = randomize(params, K(1))
  params["fc2"] = {k: v + 0.5 for k, v in params["fc2"].items()}  # the trained head
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, trainable=("fc2",))
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (
    4,
    {"conv": 2},
    {"fc1": 3},
  )
  assert config["modules_to_save"] == ["fc2"] and config["use_rslora"] is rslora
  model = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "a")).eval()
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    torch_apply(model, ids, img), twin_apply(params, ids, img), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_round_trip_with_peft(tmp_path, bias):
  # PEFT keeps the bias of a module it adapts as <module>.base_layer.bias.
  net = torch_net()
  params = lora_fn.wrap(twin_params(net), rank=3, targets=("conv", "fc1"), key=K(0))
  params = randomize(params, K(1))
  params["fc1"]["bias"] = params["fc1"]["bias"] + 0.7
  params["conv"]["bias"] = params["conv"]["bias"] - 0.3
  params["fc2"]["bias"] = params["fc2"]["bias"] + 0.2  # trained only with bias="all"
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, bias=bias)
  model = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "a")).eval()
  if bias == "lora_only":
    params["fc2"]["bias"] = twin_params(net)["fc2"]["bias"]
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    torch_apply(model, ids, img), twin_apply(params, ids, img), rtol=1e-5, atol=1e-5
  )
  back = lora_fn.load_peft(tmp_path / "a", twin_params(torch_net()), modules=MODULES)
  np.testing.assert_allclose(
    twin_apply(back, ids, img), twin_apply(params, ids, img), rtol=1e-6, atol=1e-6
  )


def _peft_adapter(path, **config):
  model = peft.get_peft_model(
    torch_net(),
    peft.LoraConfig(
      r=4,
      lora_alpha=8,
      target_modules=["embed", "conv", "fc1"],
      modules_to_save=["fc2"],
      **config,
    ),
  )
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(str(path))
  return model.eval()


@pytest.mark.parametrize(
  "config", [{}, {"rank_pattern": {"conv": 2}, "alpha_pattern": {"embed": 5}, "use_rslora": True}]
)
def test_peft_totwin_apply(tmp_path, config):
  model = _peft_adapter(tmp_path / "p", **config)
  params = lora_fn.load_peft(tmp_path / "p", twin_params(torch_net()), modules=MODULES)
  assert params["conv"]["kernel"].rank == config.get("rank_pattern", {}).get("conv", 4)
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    twin_apply(params, ids, img), torch_apply(model, ids, img), rtol=1e-5, atol=1e-5
  )
  # And back: our export of what we read is PEFT's adapter again.
  lora_fn.save_peft(tmp_path / "again", params, modules=MODULES, trainable=("fc2",))
  again = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "again")).eval()
  np.testing.assert_allclose(
    torch_apply(again, ids, img), torch_apply(model, ids, img), rtol=1e-6, atol=1e-6
  )


def test_a_wrapped_model_with_the_adapters_rank_takes_its_factors(tmp_path):
  model = _peft_adapter(tmp_path / "p")
  wrapped = lora_fn.wrap(
    twin_params(torch_net()), rank=4, targets=("embed", "conv", "fc1"), alpha=8.0, key=K(5)
  )
  params = lora_fn.load_peft(tmp_path / "p", wrapped, modules=MODULES)
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    twin_apply(params, ids, img), torch_apply(model, ids, img), rtol=1e-5, atol=1e-5
  )


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, name="fc")(h)), None

    blocks = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(name="blocks")(x, None)[0]


class _TorchStack(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.layers = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(3)])

  def forward(self, x):
    for layer in self.layers:
      x = torch.tanh(layer(x))
    return x


def test_scan_stacked_layers_are_one_module_each(tmp_path):
  torch.manual_seed(1)
  net = _TorchStack().eval()
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  base = {
    "blocks": {
      "fc": {
        "kernel": jnp.asarray(np.stack([sd[f"layers.{i}.weight"].T for i in range(3)])),
        "bias": jnp.asarray(np.stack([sd[f"layers.{i}.bias"] for i in range(3)])),
      }
    }
  }
  layouts = {"blocks/fc/kernel": ("stack", "in", "out")}
  params = randomize(lora_fn.wrap(base, rank=2, targets=("fc",), layouts=layouts, key=K(0)), K(1))
  modules = {"blocks/fc": "layers.{}"}
  lora_fn.save_peft(tmp_path / "a", params, modules=modules)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert sorted(config["target_modules"]) == ["layers.0", "layers.1", "layers.2"]
  x = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
  model = peft.PeftModel.from_pretrained(net, str(tmp_path / "a")).eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(x)).numpy()
  ours = lora_fn.lora(_Stack().apply)({"params": params}, x)
  np.testing.assert_allclose(theirs, np.asarray(ours), rtol=1e-5, atol=1e-5)
  back = lora_fn.load_peft(tmp_path / "a", base, modules=modules)  # '{}': axis 0 stacks
  np.testing.assert_array_equal(
    back["blocks"]["fc"]["kernel"].a, params["blocks"]["fc"]["kernel"].a
  )


def test_serving_problems_name_what_vllm_refuses():
  base = twin_params(torch_net())
  params = lora_fn.wrap(base, rank=4, targets=("conv", "fc1"), rank_pattern={"fc1": 2}, key=K(0))
  problems = lora_fn.serving_problems(params, trainable=("fc2",), bias="all", max_lora_rank=1)
  assert problems == [
    "it trains biases ['conv/bias', 'fc1/bias']: vLLM needs bias='none' (or a server "
    "started with --enable-lora-bias)",
    "it trains ['fc2/bias', 'fc2/kernel'] fully: vLLM takes no modules_to_save but an output "
    "head ('lm_head',)",
    "rank 2 of ['fc1/kernel'] is above the server's max_lora_rank 1",
    "rank 4 of ['conv/kernel'] is above the server's max_lora_rank 1",
    "['conv/kernel'] are convolutions: vLLM serves LoRA on linear layers",
  ]
  mixed = lora_fn.wrap(base, rank=4, targets=("fc1", "embed"), alpha_pattern={"fc1": 8.0}, key=K(0))
  assert lora_fn.serving_problems(mixed) == [
    "its modules have different scales alpha/r (1 for ['embed/embedding']; 2 for "
    "['fc1/kernel']): vLLM scales every module by one lora_alpha / r"
  ]
  assert lora_fn.serving_problems(lora_fn.wrap(base, rank=4, targets=("fc1",), key=K(0))) == []
  with pytest.raises(ValueError, match=r"max_lora_rank must be one of vLLM's \(1, 8, 16"):
    lora_fn.serving_problems(params, max_lora_rank=12)
  with pytest.raises(
    ValueError,
    match=r"vLLM would refuse this adapter: it trains \['fc2/bias', 'fc2/kernel'\] fully",
  ):
    lora_fn.save_peft(
      "/nonexistent/x", params, modules=MODULES, trainable=("fc2",), strict_serving=True
    )


def _write_peft(path, config, tensors):
  from safetensors.numpy import save_file

  os.makedirs(path)
  (path / "adapter_config.json").write_text(json.dumps(config))
  save_file(tensors, str(path / "adapter_model.safetensors"))


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc1"]}
FACTORS = {
  "base_model.model.fc1.lora_A.weight": np.zeros((2, D), np.float32),
  "base_model.model.fc1.lora_B.weight": np.zeros((HID, 2), np.float32),
}

LOAD_ERRORS = [
  (
    "ia3",
    {**LORA, "peft_type": "IA3"},
    FACTORS,
    ValueError,
    r"peft_type 'IA3' is not supported; lorax_fn reads LoRA and AdaLoRA adapters",
  ),
  (
    "dora_without_magnitudes",
    {**LORA, "use_dora": True},
    FACTORS,
    ValueError,
    r"use_dora=True but no lora_magnitude_vector for 'fc1' \(a DoRA adapter needs one",
  ),
  (
    "corda",
    {**LORA, "init_lora_weights": "corda"},
    FACTORS,
    ValueError,
    r"init_lora_weights='corda': the adapter is relative to the base that init made, the "
    r"residual of a decomposition driven by the training data's activations; lorax_fn "
    r"re-derives that base only for \('pissa', 'olora'\). Either convert it with PEFT to a "
    r"plain LoRA on the original base \(peft_model.save_pretrained\(out, "
    r"path_initial_model_for_weight_conversion=",
  ),
  (
    "unknown_init",
    {**LORA, "init_lora_weights": "svd"},
    FACTORS,
    ValueError,
    r"init_lora_weights='svd' is not a PEFT init lorax_fn knows; it reads \(True, False, "
    r"'gaussian', 'eva', 'orthogonal', 'mica', 'pissa', 'olora'\)",
  ),
  (
    "unknown_module",
    LORA,
    {
      **FACTORS,
      "base_model.model.fc3.lora_A.weight": np.zeros((2, D)),
      "base_model.model.fc3.lora_B.weight": np.zeros((HID, 2)),
    },
    ValueError,
    r"names modules the model lacks: \['fc3'\]; nearest known module names: \['fc2', 'fc1'\]",
  ),
  (
    "bad_shape",
    LORA,
    {**FACTORS, "base_model.model.fc1.lora_A.weight": np.zeros((2, 7))},
    ValueError,
    r"'base_model.model.fc1.lora_A.weight' has shape \(2, 7\); the Linear at "
    r"'fc1/kernel' \(kernel shape \(6, 13\), rank 2\) needs \(2, 6\)",
  ),
  (
    "half_pair",
    LORA,
    {"base_model.model.fc1.lora_A.weight": np.zeros((2, D), np.float32)},
    ValueError,
    r"has only lora_A for 'fc1'",
  ),
  ("no_rank", {**LORA, "r": 0}, FACTORS, ValueError, r"r must be a positive number; got: 0"),
]


@pytest.mark.parametrize(
  "name, config, tensors, exc, regex", LOAD_ERRORS, ids=[e[0] for e in LOAD_ERRORS]
)
def test_load_errors(tmp_path, name, config, tensors, exc, regex):
  _write_peft(tmp_path / "p", config, tensors)
  with pytest.raises(exc, match=regex):
    lora_fn.load_peft(tmp_path / "p", twin_params(torch_net()), modules=MODULES)


def test_missing_and_damaged_files_are_named(tmp_path):
  base = twin_params(torch_net())
  with pytest.raises(FileNotFoundError, match=r"PEFT adapter file '.*nowhere/adapter_config.json'"):
    lora_fn.load_peft(tmp_path / "nowhere", base, modules=MODULES)
  _write_peft(tmp_path / "p", LORA, FACTORS)
  weights = tmp_path / "p" / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:40])
  with pytest.raises(
    ValueError, match=r"PEFT adapter file '.*adapter_model.safetensors' is damaged"
  ):
    lora_fn.load_peft(tmp_path / "p", base, modules=MODULES)
  (tmp_path / "p" / "adapter_config.json").write_text('{"peft_type": "LO')
  with pytest.raises(ValueError, match=r"PEFT adapter file '.*adapter_config.json' is damaged"):
    lora_fn.load_peft(tmp_path / "p", base, modules=MODULES)


def test_save_errors(tmp_path):
  params = lora_fn.wrap(twin_params(torch_net()), rank=2, targets=("fc1", "conv"), key=K(0))
  with pytest.raises(ValueError, match=r"modules names no PyTorch module for \['conv'\]"):
    lora_fn.save_peft(tmp_path / "a", params, modules={"fc1": "fc1"})
  with pytest.raises(
    ValueError, match=r"modules maps both 'conv/kernel' and 'fc1/kernel' to the PyTorch module 'x'"
  ):
    lora_fn.save_peft(tmp_path / "a", params, modules={"fc1": "x", "conv": "x"})
  with pytest.raises(ValueError, match=r"needs a '\{\}' placeholder for the layer index"):
    stacked = lora_fn.wrap(
      {"s": {"kernel": jnp.ones((3, 5, 7))}},
      rank=2,
      targets=("s",),
      layouts={"s": ("stack", "in", "out")},
      key=K(0),
    )
    lora_fn.save_peft(tmp_path / "a", stacked, modules={"s": "s"})
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES)
  with pytest.raises(ValueError, match=r"already exists; pass overwrite=True"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES)
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, overwrite=True)


def _two_peft_adapters(path, rank_b):
  """A PEFT model with adapters 'one' (rank 4) and 'two' (rank ``rank_b``), random factors."""
  targets = ["embed", "conv", "fc1"]
  model = peft.get_peft_model(
    torch_net(), peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets), adapter_name="one"
  )
  model.add_adapter("two", peft.LoraConfig(r=rank_b, lora_alpha=3, target_modules=targets))
  gen = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(str(path), selected_adapters=["one", "two"])  # in path/one, path/two
  return model


@pytest.mark.parametrize(
  "method, rank_b, density",
  [
    ("linear", 4, None),
    ("cat", 2, None),
    ("svd", 2, None),
    ("ties", 4, 0.5),
    ("magnitude_prune", 4, 0.6),
  ],
)
def test_weighted_adapter_matches_peft(tmp_path, method, rank_b, density):
  model = _two_peft_adapters(tmp_path / "p", rank_b)
  weights = [0.7, -0.4]
  model.add_weighted_adapter(
    ["one", "two"], weights, "mix", combination_type=method, density=density
  )
  model.set_adapter("mix")
  model.eval()
  base = twin_params(torch_net())
  ours = [lora_fn.load_peft(tmp_path / "p" / n, base, modules=MODULES) for n in ("one", "two")]
  mixed = lora_fn.weighted_adapter(ours, weights, method=method, density=density)
  ids, img = twin_inputs()
  np.testing.assert_allclose(
    twin_apply(mixed, ids, img), torch_apply(model, ids, img), rtol=1e-5, atol=1e-5
  )


def test_cat_is_exactly_the_weighted_sum_and_svd_its_best_rank_k_fit():
  base = twin_params(torch_net())
  a = randomize(lora_fn.wrap(base, rank=3, alpha=5.0, targets=("fc1", "conv"), key=K(0)), K(1))
  b = randomize(lora_fn.wrap(base, rank=2, alpha=2.0, targets=("fc1", "conv"), key=K(2)), K(3))
  delta = lambda p: lora_fn.merge(p)["fc1"]["kernel"] - base["fc1"]["kernel"]
  want = 0.6 * delta(a) + 1.5 * delta(b)
  cat = lora_fn.weighted_adapter([a, b], [0.6, 1.5], method="cat")
  assert cat["fc1"]["kernel"].rank == 5
  np.testing.assert_allclose(delta(cat), want, rtol=1e-5, atol=1e-6)
  svd = lora_fn.weighted_adapter([a, b], [0.6, 1.5], method="svd", rank=2)
  u, s, vt = np.linalg.svd(np.asarray(want, np.float64))
  np.testing.assert_allclose(delta(svd), (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-5, atol=1e-5)


def test_dare_keeps_a_density_fraction_rescaled():
  base = {"fc": {"kernel": jnp.ones((64, 96))}}
  a = randomize(lora_fn.wrap(base, rank=8, targets=("fc",), key=K(0)), K(1))
  out = lora_fn.weighted_adapter([a], [1.0], method="dare_linear", density=0.3, key=K(2))
  kept, orig = np.asarray(out["fc"]["kernel"].a), np.asarray(a["fc"]["kernel"].a)
  nonzero = kept != 0
  assert abs(nonzero.mean() - 0.3) < 0.04
  np.testing.assert_allclose(kept[nonzero], orig[nonzero] / 0.3, rtol=1e-6)


MIX_ERRORS = [
  (dict(method="average"), ValueError, r"method must be one of \('linear', 'cat', 'svd'"),
  (dict(method="cat", weights=[1.0]), ValueError, r"weights must hold 2 finite numbers"),
  (dict(method="ties"), ValueError, r"method 'ties' needs density, the kept fraction in \(0, 1\]"),
  (dict(method="ties", density=1.5), ValueError, r"density must be in \(0, 1\]; got: 1.5"),
  (dict(method="ties", density=0.0), ValueError, r"density must be a positive finite number"),
  (dict(method="dare_ties", density=0.5), ValueError, r"method 'dare_ties' prunes at random"),
  (
    dict(method="linear", ranks=(2, 3)),
    ValueError,
    r"method 'linear' needs adapters of one rank; at 'fc1/kernel' they have ranks \[2, 3\]",
  ),
  (dict(method="cat", density=0.5), ValueError, r"density is for the pruning methods"),
]


@pytest.mark.parametrize("kwargs, exc, regex", MIX_ERRORS)
def test_weighted_adapter_errors(kwargs, exc, regex):
  base = twin_params(torch_net())
  ranks = kwargs.pop("ranks", (2, 2))
  adapters = [lora_fn.wrap(base, rank=r, targets=("fc1",), key=K(r)) for r in ranks]
  weights = kwargs.pop("weights", [1.0, 1.0])
  with pytest.raises(exc, match=regex):
    lora_fn.weighted_adapter(adapters, weights, **kwargs)


def test_load_refuses_two_paths_on_one_module_and_kernels_of_a_transposed_kind(tmp_path):
  _write_peft(tmp_path / "p", LORA, FACTORS)
  base = twin_params(torch_net())
  with pytest.raises(
    ValueError, match=r"modules maps both 'fc1' and 'fc2' to the PyTorch module 'fc1'"
  ):
    lora_fn.load_peft(tmp_path / "p", base, modules={**MODULES, "fc2": "fc1"})
  head = {"base_model.model.fc2.weight": np.zeros((OUT, HID), np.float32)}
  _write_peft(tmp_path / "q", {**LORA, "fan_in_fan_out": True}, {**FACTORS, **head})
  with pytest.raises(ValueError, match=r"fan_in_fan_out=True stores 'base_model.model.fc2.weight'"):
    lora_fn.load_peft(tmp_path / "q", base, modules=MODULES)
  _write_peft(tmp_path / "r", {**LORA, "fan_in_fan_out": True}, FACTORS)  # factors only: fine
  assert lora_fn.load_peft(tmp_path / "r", base, modules=MODULES)["fc1"]["kernel"].rank == 2
