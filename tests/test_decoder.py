"""train/decoder.py: Hugging Face decoder checkpoints in and out, float, NF4 and bitsandbytes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize

import lorax_fn as lora_fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))

import decoder

torch = pytest.importorskip(
  "torch", reason="interop extra not installed: pip install -e '.[interop]'"
)
transformers = pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")

K = jax.random.key
IDS = np.array([[1, 5, 9, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42]])
# Pairwise-distinct sizes; q/o/gate/up/down hold whole blocks of 256 NF4 scales per layer
# (128 * 128 / 64 = 256), k/v (128 x 64) do not: both ways of stacking bitsandbytes layers.
SIZES = dict(
  hidden_size=128,
  intermediate_size=256,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  vocab_size=101,
  max_position_embeddings=64,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module(model, layer, name):
  block = model.model.layers[layer]
  return getattr(
    block.mlp if name in ("gate_proj", "up_proj", "down_proj") else block.self_attn, name
  )


def _kernel_path(name):
  return ("mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn", name, "kernel")


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A sharded Llama, a tied Qwen2 and bitsandbytes NF4 Llamas (with and without DQ)."""
  root = tmp_path_factory.mktemp("decoders")
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
  llama.save_pretrained(root / "llama", max_shard_size="300KB")
  qwen = transformers.Qwen2ForCausalLM(
    transformers.Qwen2Config(**SIZES, tie_word_embeddings=True)
  ).eval()
  qwen.save_pretrained(root / "qwen2")
  out = {"llama": (root / "llama", llama), "qwen2": (root / "qwen2", qwen)}
  for dq in (True, False):
    bnb = transformers.AutoModelForCausalLM.from_pretrained(
      root / "llama",
      quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=torch.float32,
      ),
      device_map="cpu",
    )
    name = f"bnb_dq{int(dq)}"
    bnb.save_pretrained(root / name)
    out[name] = (root / name, bnb)
  return out


def _copy(src, dst, edit_config=None, edit_tensors=None):
  """A copy of a single-file checkpoint, its config or tensors changed."""
  from safetensors.numpy import load_file, save_file

  shutil.copytree(src, dst)
  if edit_config:
    with open(dst / "config.json") as f:
      config = json.load(f)
    edit_config(config)
    with open(dst / "config.json", "w") as f:
      json.dump(config, f)
  if edit_tensors:
    state = load_file(dst / "model.safetensors")
    edit_tensors(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_transformers_checkpoints_with_equal_logits(checkpoints, arch):
  path, ref = checkpoints[arch]
  if arch == "llama":
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2  # sharded
  model, variables = decoder.load_hf_decoder(path)
  params = variables["params"]
  state = ref.state_dict()
  np.testing.assert_array_equal(
    params["layers_1"]["mlp"]["down_proj"]["kernel"],
    state["model.layers.1.mlp.down_proj.weight"].numpy().T,
  )
  np.testing.assert_array_equal(
    params["embed_tokens"]["embedding"], state["model.embed_tokens.weight"].numpy()
  )
  assert ("lm_head" in params) is (arch == "llama")
  assert ("bias" in params["layers_0"]["self_attn"]["q_proj"]) is (arch == "qwen2")
  got = jax.jit(model.apply)(variables, IDS)
  np.testing.assert_allclose(got, _torch_logits(ref), rtol=1e-5, atol=1e-5)


def test_scan_layers_stacks_each_parameter(checkpoints):
  path, ref = checkpoints["llama"]
  _, unrolled = decoder.load_hf_decoder(path)
  model, scanned = decoder.load_hf_decoder(path, scan_layers=True, remat=True)
  assert model.config.scan_layers and model.config.remat
  want = decoder.stack_layers(unrolled["params"], 2)
  jax.tree.map(np.testing.assert_array_equal, scanned["params"], want)
  np.testing.assert_allclose(
    jax.jit(model.apply)(scanned, IDS), _torch_logits(ref), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_nf4_on_the_fly_is_bitsandbytes_codes(checkpoints, scan):
  """Quantised as read, in PyTorch order: bitsandbytes' codes and scales, bit for bit."""
  path, ref = checkpoints["llama"]
  _, variables = decoder.load_hf_decoder(path, quantize="nf4", double_quant=False, scan_layers=scan)
  params = variables["params"]
  assert not lora_fn.is_quant(params["embed_tokens"]["embedding"])
  for layer in range(2):
    for name in LINEARS:
      w = _module(ref, layer, name).weight.detach()
      packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
      q = decoder._get(params, ("layers" if scan else f"layers_{layer}", *_kernel_path(name)))
      assert q.transposed and q.shape == ((2,) if scan else ()) + tuple(w.shape[::-1])
      codes, absmax = np.asarray(q.codes), np.asarray(q.absmax)
      if scan:
        codes = codes.reshape(2, -1)[layer]
        absmax = absmax.reshape(2, -1)[layer]
      np.testing.assert_array_equal(codes, packed.numpy().reshape(-1))
      np.testing.assert_array_equal(absmax, state.absmax.numpy())
      deq = np.asarray(q.dequantize())
      np.testing.assert_array_equal(
        deq[layer] if scan else deq, F.dequantize_4bit(packed, state).numpy().T
      )


_dequantize = jax.jit(lambda q: q.dequantize())


def _bnb_reference(bnb, layer, name):
  w = _module(bnb, layer, name).weight
  return F.dequantize_4bit(w.data, w.quant_state).numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("dq", [1, 0], ids=["dq", "no_dq"])
def test_bitsandbytes_checkpoint_decodes_bit_for_bit(checkpoints, dq, scan):
  path, bnb = checkpoints[f"bnb_dq{dq}"]
  model, variables = decoder.load_hf_decoder(path, scan_layers=scan)
  params = variables["params"]
  for layer in range(2):
    for name in LINEARS:
      q = decoder._get(params, ("layers" if scan else f"layers_{layer}", *_kernel_path(name)))
      assert lora_fn.is_quant(q) and q.transposed and q.kind == "nf4"
      deq = np.asarray(_dequantize(q))
      np.testing.assert_array_equal(deq[layer] if scan else deq, _bnb_reference(bnb, layer, name).T)
  if scan and dq:  # 256 scales per layer of q_proj: one offset per layer; k_proj: float32 scales
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].offset.shape == (2,)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].absmax is not None
  if not scan:  # stored as is: 4.127 (DQ) or 4.5 bits a parameter
    q = params["layers_0"]["mlp"]["up_proj"]["kernel"]
    bits = 8 * sum(np.asarray(x).nbytes for x in jax.tree.leaves(q)) / q.size
    assert bits == pytest.approx(4.127 if dq else 4.5, abs=0.01)
  # The model computes with those weights: transformers' float model given them agrees.
  dense, _ = checkpoints["llama"]
  ref = transformers.LlamaForCausalLM.from_pretrained(dense).eval()
  with torch.no_grad():
    for layer in range(2):
      for name in LINEARS:
        _module(ref, layer, name).weight.copy_(torch.from_numpy(_bnb_reference(bnb, layer, name)))
  got = jax.jit(lora_fn.lora(model.apply))(variables, IDS)
  np.testing.assert_allclose(got, _torch_logits(ref), rtol=1e-5, atol=1e-5)


def _drop(key):
  return lambda state: state.pop(key)


def _put(key, value):
  return lambda state: state.__setitem__(key, value)


def _set_config(**kv):
  return lambda config: config.update(kv)


def _bnb_config(**kv):
  return lambda config: config["quantization_config"].update(kv)


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
ERRORS = [
  # (name, checkpoint, config edit, tensor edit, load options, exception, message)
  (
    "missing tensor",
    "qwen2",
    None,
    _drop("model.layers.1.mlp.up_proj.weight"),
    {},
    ValueError,
    r"no tensor 'model.layers.1.mlp.up_proj.weight' \(shape \(256, 128\), for "
    r"params/layers_1/mlp/up_proj/kernel\)",
  ),
  (
    "wrong kernel shape",
    "qwen2",
    None,
    _put("model.layers.0.self_attn.k_proj.weight", np.zeros((128, 128), np.float32)),
    {},
    ValueError,
    r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(128, 128\); the model "
    r"expects \(64, 128\)",
  ),
  (
    "wrong norm shape",
    "qwen2",
    None,
    _put("model.norm.weight", np.zeros(127, np.float32)),
    {},
    ValueError,
    r"'model.norm.weight' has shape \(127,\); the model expects \(128,\)",
  ),
  (
    "unexpected tensors",
    "qwen2",
    None,
    _put("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)),
    {},
    ValueError,
    r"the checkpoint has 1 tensors the qwen2 model does not: \['model.layers.0.mlp.extra.weight'\]",
  ),
  (
    "integer weights",
    "qwen2",
    None,
    _put("model.norm.weight", np.zeros(128, np.int32)),
    {},
    ValueError,
    r"'model.norm.weight' has dtype int32; expected a float dtype",
  ),
  (
    "architecture",
    "qwen2",
    _set_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
    None,
    {},
    ValueError,
    r"unsupported decoder: model_type 'gpt2', architectures \['GPT2LMHeadModel'\]",
  ),
  (
    "fp4 checkpoint",
    "bnb_dq1",
    _bnb_config(bnb_4bit_quant_type="fp4"),
    None,
    {},
    ValueError,
    r"bnb_4bit_quant_type 'fp4' is not supported.*fp4 is not supported",
  ),
  (
    "8-bit checkpoint",
    "bnb_dq1",
    _bnb_config(load_in_8bit=True, load_in_4bit=False),
    None,
    {},
    ValueError,
    r"bitsandbytes 8-bit checkpoints \(load_in_8bit\) are not supported",
  ),
  (
    "other quantisation",
    "qwen2",
    _set_config(quantization_config={"quant_method": "gptq", "bits": 4}),
    None,
    {},
    ValueError,
    r"quant_method 'gptq', which is not supported",
  ),
  (
    "fp4 weight",
    "bnb_dq1",
    None,
    lambda s: s.__setitem__(
      f"{Q_PROJ}.quant_state.bitsandbytes__fp4", s.pop(f"{Q_PROJ}.quant_state.bitsandbytes__nf4")
    ),
    {},
    ValueError,
    rf"'{Q_PROJ}' is a bitsandbytes fp4 weight; only nf4 is supported",
  ),
  (
    "another code table",
    "bnb_dq1",
    None,
    _put(f"{Q_PROJ}.quant_map", np.linspace(-1, 1, 16, dtype=np.float32)),
    {},
    ValueError,
    rf"{Q_PROJ}.quant_map is not bitsandbytes' NF4 code table",
  ),
  (
    "missing statistic",
    "bnb_dq1",
    None,
    _drop(f"{Q_PROJ}.nested_absmax"),
    {},
    ValueError,
    rf"the bitsandbytes weight '{Q_PROJ}' has no {Q_PROJ}.nested_absmax tensor",
  ),
  (
    "int8 over bnb",
    "bnb_dq1",
    None,
    None,
    {"quantize": "int8"},
    ValueError,
    r"the checkpoint is bitsandbytes NF4 .*quantize='int8' cannot apply to it",
  ),
  ("kind", "qwen2", None, None, {"quantize": "fp8"}, ValueError, r"quantize must be None or one"),
  (
    "block size",
    "qwen2",
    None,
    None,
    {"quantize": "nf4", "block_size": 48},
    ValueError,
    r"block_size must be a positive power of two; got: 48",
  ),
  (
    "targets",
    "qwen2",
    None,
    None,
    {"quantize": "nf4", "quantize_targets": ("qproj",)},
    ValueError,
    r"targets \('qproj',\) matched no parameter",
  ),
]


@pytest.mark.parametrize(
  "source, config, tensors, options, exc, regex",
  [e[1:] for e in ERRORS],
  ids=[e[0] for e in ERRORS],
)
def test_errors(checkpoints, tmp_path, source, config, tensors, options, exc, regex):
  path = _copy(checkpoints[source][0], tmp_path / "ckpt", config, tensors)
  with pytest.raises(exc, match=regex):
    decoder.load_hf_decoder(path, **options)


def test_harmless_extras_and_missing_checkpoints(checkpoints, tmp_path, monkeypatch):
  path = _copy(
    checkpoints["qwen2"][0],
    tmp_path / "ckpt",
    edit_tensors=_put("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(16, np.float32)),
  )
  decoder.load_hf_decoder(path)  # an old file's rotary table is no parameter, and no error
  with pytest.raises(FileNotFoundError, match=r"no checkpoint directory at '/nonexistent/x'"):
    decoder.load_hf_decoder("/nonexistent/x")
  os.remove(path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"has neither model.safetensors nor"):
    decoder.load_hf_decoder(path)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(decoder.HubUnreachable, match=r"cannot fetch 'no-org/no-model'"):
    decoder.load_hf_decoder("no-org/no-model")


def _wrapped(variables, key):
  """Random LoRA factors on q/v/down of every layer (scanned kernels with their layout)."""
  from decoder_model import layouts

  params = variables["params"]
  targets = ("q_proj", "v_proj", "down_proj")
  params = lora_fn.wrap(params, rank=3, targets=targets, layouts=layouts(params) or None, key=key)
  return {"params": randomize(params, K(9), scale=0.1)}


@pytest.mark.parametrize(
  "arch, options",
  [("qwen2", {}), ("llama", {"quantize": "nf4", "scan_layers": True})],
  ids=["qwen2-lora", "llama-qlora-scanned"],
)
def test_saved_merged_model_loads_in_transformers_with_equal_logits(
  checkpoints, tmp_path, arch, options
):
  model, variables = decoder.load_hf_decoder(checkpoints[arch][0], **options)
  variables = _wrapped(variables, K(1))
  want = jax.jit(lora_fn.lora(model.apply))(variables, IDS)
  with open(checkpoints[arch][0] / "config.json") as f:
    base = json.load(f)
  out = tmp_path / "merged"
  decoder.save_hf_decoder(out, model, variables, base_config=base, max_shard_size=200_000)
  assert os.path.isfile(out / "model.safetensors.index.json")  # sharded by max_shard_size
  ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(ref).__name__ == decoder.ARCHITECTURES[arch]
  np.testing.assert_allclose(_torch_logits(ref), want, rtol=1e-5, atol=1e-5)
  if not model.config.scan_layers:  # our own loader reads our shards back: the merged model
    again, loaded = decoder.load_hf_decoder(out)
    np.testing.assert_allclose(jax.jit(again.apply)(loaded, IDS), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"already exists; pass overwrite=True"):
    decoder.save_hf_decoder(out, model, variables)


def test_bfloat16_round_trip_and_save_errors(checkpoints, tmp_path):
  """bfloat16 tensors are read and written as such (safetensors' numpy backend cannot)."""
  model, variables = decoder.load_hf_decoder(checkpoints["qwen2"][0], param_dtype="bfloat16")
  assert model.config.param_dtype == jnp.bfloat16
  decoder.save_hf_decoder(tmp_path / "bf16", model, variables)
  header = decoder.read_header(str(tmp_path / "bf16" / "model.safetensors"))
  assert {t.dtype.name for t in header.values()} == {"bfloat16"}
  _, again = decoder.load_hf_decoder(tmp_path / "bf16")  # param_dtype from its config: bf16
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  assert jax.tree.leaves(again)[0].dtype == jnp.bfloat16
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert ref.dtype == torch.bfloat16
  with pytest.raises(ValueError, match=r"params do not fit the model .*missing \['norm/scale'\]"):
    params = {k: v for k, v in variables["params"].items() if k != "norm"}
    decoder.save_hf_decoder(tmp_path / "x", model, {"params": params})
  with pytest.raises(ValueError, match=r"variables must be a dict with 'params'"):
    decoder.save_hf_decoder(tmp_path / "x", model, variables["params"])
  with pytest.raises(TypeError, match=r"model must be a decoder_model.Decoder; got: str"):
    decoder.save_hf_decoder(tmp_path / "x", "model", variables)


def test_placed_on_a_mesh_leaf_by_leaf(checkpoints):
  mesh = lora_fn.make_mesh("fsdp=-1")
  # One device here: explicit specs show the rules reach each leaf (lorax_fn tests the splits).
  P = jax.sharding.PartitionSpec
  rules = [
    (r".*/q_proj/kernel", P("fsdp", None)),
    (r"params/embed_tokens/embedding", P(None, "fsdp")),
  ]
  _, variables = decoder.load_hf_decoder(
    checkpoints["llama"][0], quantize="nf4", mesh=mesh, rules=rules
  )
  q = variables["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  for x in jax.tree.leaves(variables):
    assert x.sharding.mesh == mesh
  assert q.codes.sharding.spec == P("fsdp")  # codes split along their blocks
  assert variables["params"]["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
  assert variables["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].codes.sharding.spec == P()
  # A stacked bitsandbytes checkpoint: per-layer offsets and float32 scales placed alike.
  _, variables = decoder.load_hf_decoder(checkpoints["bnb_dq1"][0], scan_layers=True, mesh=mesh)
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(variables))


def test_hf_config_round_trips_llama3_rope_scaling():
  from decoder_model import RopeScaling

  c = decoder.DecoderConfig(
    11,
    8,
    12,
    2,
    4,
    2,
    head_dim=4,
    rope_theta=5e5,
    rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
    attention_bias=True,
    o_proj_bias=True,
    mlp_bias=True,
    max_position_embeddings=512,
  )
  hf = decoder.hf_config(c, base={"bos_token_id": 7, "quantization_config": {}, "rope_theta": 1.0})
  assert hf["bos_token_id"] == 7 and "quantization_config" not in hf and "rope_theta" not in hf
  assert decoder.DecoderConfig.from_hf(hf) == c
  with pytest.raises(ValueError, match=r"a Llama model has biases on all of q/k/v/o or on none"):
    decoder.hf_config(dataclasses.replace(c, o_proj_bias=False))


def test_host_memory_stays_near_one_tensor(tmp_path):
  """Peak host allocations while loading stay far below the float model's size."""
  config = decoder.DecoderConfig(2048, 256, 640, 8, 4, 2, head_dim=64)
  model = decoder.Decoder(config)
  shapes = jax.eval_shape(model.init, K(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), shapes)
  decoder.save_hf_decoder(tmp_path / "big", model, variables, max_shard_size=1 << 20)
  total = sum(x.nbytes for x in jax.tree.leaves(variables))  # 25 MB of float32
  largest = max(x.nbytes for x in jax.tree.leaves(variables))  # 2 MB: the embedding
  del variables
  for quantize in ("nf4", None):
    tracemalloc.start()
    try:
      decoder.load_hf_decoder(tmp_path / "big", quantize=quantize)
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
    # A loader holding the float model would peak above 25 MB. About 3 tensors' worth is
    # typical; device transfers still in flight on a loaded machine keep a few host copies
    # alive a little longer, hence the margin.
    assert peak < 4 * largest < total / 3, (quantize, peak, largest, total)
