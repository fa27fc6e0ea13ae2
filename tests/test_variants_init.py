"""PiSSA, OLoRA and LoftQ inits (``lorax_fn/_init.py``) against PEFT and bitsandbytes.

A tiny torch model (two ``Linear`` layers of pairwise-distinct sizes) and its JAX twin: the
factors equal PEFT's (within SVD / QR sign conventions), the residual base is PEFT's base,
training steps agree, and the export is the plain LoRA PEFT loads onto the original model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_np

import lorax_fn as lora_fn
from lorax_fn import _init

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

K = jax.random.key
D, HID, OUT, R = 11, 13, 7, 3
MODULES = {"fc1": "fc1", "fc2": "fc2"}


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc1 = torch.nn.Linear(D, HID)
    self.fc2 = torch.nn.Linear(HID, OUT)

  def forward(self, x):
    return self.fc2(torch.tanh(self.fc1(x)))


def _net():
  torch.manual_seed(0)
  return TorchNet().eval()


def _params(net):
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  return {
    m: {"kernel": jnp.asarray(sd[f"{m}.weight"].T), "bias": jnp.asarray(sd[f"{m}.bias"])}
    for m in ("fc1", "fc2")
  }


def model(params, x):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


X = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
ours = jax.jit(lora_fn.lora(model))
merge = jax.jit(lora_fn.merge)  # compiled, not op by op: the tests compare values only
merged32 = jax.jit(lambda leaf: leaf.merged(jnp.float32))
dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def _theirs(net, x=X):
  with torch.no_grad():
    return net(torch.as_tensor(x)).numpy()


def _peft_model(init, alpha=5, rslora=False):
  config = peft.LoraConfig(
    r=R,
    lora_alpha=alpha,
    target_modules=["fc1", "fc2"],
    init_lora_weights=init,
    use_rslora=rslora,
  )
  return peft.get_peft_model(_net(), config)


def _peft_state(pm, m):
  layer = getattr(pm.base_model.model, m)
  get = lambda t: t.detach().numpy().copy()
  return (
    get(layer.lora_A["default"].weight),
    get(layer.lora_B["default"].weight),
    get(layer.base_layer.weight),
  )


def _signs(a, a_ref):
  """Per rank component, the sign that turns ``a``'s row into ``a_ref``'s."""
  return np.sign(np.sum(a * a_ref, axis=1))


# ------------------------------------------------------------------------------------------
# PiSSA / OLoRA init
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_factors_and_residual_equal_peft(init, rslora):
  pm = _peft_model(init, rslora=rslora)
  params = lora_fn.wrap(
    _params(_net()),
    rank=R,
    alpha=5.0,
    rslora=rslora,
    targets=("fc1", "fc2"),
    init=init,
    key=K(0),
  )
  for m in ("fc1", "fc2"):
    leaf = params[m]["kernel"]
    a_ref, b_ref, w_ref = _peft_state(pm, m)
    a, b = np.asarray(leaf.a), np.asarray(leaf.b).T  # ours: a (r, in), b (r, out)
    sign = _signs(a, a_ref)
    # float32 SVDs (LAPACK's and torch's) of these 13x11 / 7x13 matrices agree to ~3e-6.
    np.testing.assert_allclose(a * sign[:, None], a_ref, atol=1e-5)
    np.testing.assert_allclose(b * sign[None, :], b_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(leaf.w).T, w_ref, atol=1e-5)
  # The freshly wrapped model is the original one, and so is PEFT's.
  np.testing.assert_allclose(np.asarray(ours(params, X)), _theirs(_net()), atol=2e-6)
  np.testing.assert_allclose(_theirs(pm), _theirs(_net()), atol=2e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_and_unwrap(init):
  base = _params(_net())
  params = lora_fn.wrap(base, rank=R, alpha=2.0, targets=("fc1",), init=init, key=K(0))
  leaf = params["fc1"]["kernel"]
  # unwrap is the base the model holds: the residual, as PEFT's base layer.
  residual = lora_fn.unwrap(params)["fc1"]["kernel"]
  assert residual is leaf.w
  s = leaf.scale
  ba = lambda x: np.asarray(x.a).T @ np.asarray(x.b)  # numpy: no compilation in the test
  np.testing.assert_allclose(residual, np.asarray(base["fc1"]["kernel"]) - s * ba(leaf), atol=1e-6)
  # merge before training is the original kernel; after, the fine-tuned one.
  np.testing.assert_allclose(merge(params)["fc1"]["kernel"], base["fc1"]["kernel"], atol=1e-6)
  trained = randomize_np(params, 1, scale=0.1)
  t = trained["fc1"]["kernel"]
  np.testing.assert_allclose(
    merge(trained)["fc1"]["kernel"], np.asarray(residual) + s * ba(t), atol=1e-6
  )


def test_stacked_and_nd_kernels_are_per_layer_matrices():
  # A scan-stacked (stack, in, out) kernel and a DenseGeneral (in, heads, head_dim): PiSSA on
  # each layer's (out, in) matrix, the heads flattened as PyTorch's out_features.
  rng = np.random.default_rng(1)
  base = {
    "layers": {"kernel": jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)},
    "query": {"kernel": jnp.asarray(rng.normal(size=(11, 3, 4)), jnp.float32)},
  }
  layouts = {"layers": ("stack", "in", "out")}
  params = lora_fn.wrap(
    base, rank=2, targets=("layers", "query"), init="pissa", layouts=layouts, key=K(0)
  )
  stacked = params["layers"]["kernel"]
  for i in range(2):
    w = np.asarray(base["layers"]["kernel"])[i].T  # (out, in)
    u, s, vh = np.linalg.svd(w)
    a = np.asarray(stacked.a)[i]
    sign = _signs(a, np.sqrt(s[:2])[:, None] * vh[:2])
    np.testing.assert_allclose(a * sign[:, None], np.sqrt(s[:2])[:, None] * vh[:2], atol=1e-5)
  q = params["query"]["kernel"]
  assert (q.a.shape, q.b.shape) == ((2, 11), (2, 3, 4))
  w = np.asarray(base["query"]["kernel"]).reshape(11, 12).T
  u, s, vh = np.linalg.svd(w)
  np.testing.assert_allclose(
    np.asarray(q.b).reshape(2, 12).T @ np.asarray(q.a), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5
  )
  merged = merge(params)
  for m in base:
    np.testing.assert_allclose(merged[m]["kernel"], base[m]["kernel"], atol=1e-5)


def test_bf16_base_keeps_float32_factors():
  base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(_net()))
  params = lora_fn.wrap(base, rank=R, targets=("fc1",), init="pissa", key=K(0))
  leaf = params["fc1"]["kernel"]
  assert (leaf.w.dtype, leaf.a.dtype, leaf.b.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  np.testing.assert_allclose(
    np.asarray(merged32(leaf)), np.asarray(base["fc1"]["kernel"], np.float32), atol=1e-2
  )


def test_randomized_svd_is_torchs_given_its_test_matrix():
  w = torch.randn(9, 14, generator=torch.Generator().manual_seed(0))
  for m in (w, w.T):
    torch.manual_seed(7)
    omega = torch.randn(min(m.shape), 4)
    torch.manual_seed(7)
    u, s, v = torch.svd_lowrank(m, q=4, niter=2)
    lowrank = jax.jit(_init.svd_lowrank, static_argnums=(1, 2))
    mu, ms, mv = lowrank(jnp.asarray(m.numpy()), 4, 2, jnp.asarray(omega.numpy()))
    np.testing.assert_allclose(ms, s.numpy(), rtol=1e-5)
    sign = _signs(np.asarray(mu).T, u.numpy().T)
    np.testing.assert_allclose(np.asarray(mu) * sign, u.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mv) * sign, v.numpy(), atol=1e-5)


def test_pissa_niter_is_reproducible_with_a_key_and_near_the_exact_svd():
  rng = np.random.default_rng(3)
  u, _ = np.linalg.qr(rng.normal(size=(13, 11)))
  v, _ = np.linalg.qr(rng.normal(size=(11, 11)))
  w = (u * 0.2 ** np.arange(11)) @ v.T  # (out, in) with a decaying spectrum
  base = {"fc": {"kernel": jnp.asarray(w.T, jnp.float32)}}
  wrap = lambda init, key: lora_fn.wrap(base, rank=R, targets=("fc",), init=init, key=key)["fc"][
    "kernel"
  ]
  leaf, again, other = (wrap("pissa_niter_4", k) for k in (K(0), K(0), K(1)))
  np.testing.assert_array_equal(leaf.a, again.a)
  assert not np.array_equal(leaf.a, other.a)
  delta = lambda x: np.asarray(x.a).T @ np.asarray(x.b)
  np.testing.assert_allclose(delta(leaf), delta(wrap("pissa", K(0))), atol=1e-4)
  np.testing.assert_allclose(merged32(leaf), base["fc"]["kernel"], atol=1e-6)


# ------------------------------------------------------------------------------------------
# Training: outputs and gradients equal PEFT's given equal factors
# ------------------------------------------------------------------------------------------


def _from_peft(pm, params):
  """Our wrapped params holding PEFT's factors and residual base."""
  out = dict(params)
  for m in ("fc1", "fc2"):
    a, b, w = _peft_state(pm, m)
    leaf = params[m]["kernel"]
    out[m] = {
      **params[m],
      "kernel": dataclasses.replace(leaf, w=jnp.asarray(w.T), a=jnp.asarray(a), b=jnp.asarray(b.T)),
    }
  return out


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_training_step_equals_peft(init):
  pm = _peft_model(init)
  params = _from_peft(
    pm,
    lora_fn.wrap(_params(_net()), rank=R, alpha=5.0, targets=("fc1", "fc2"), init=init, key=K(0)),
  )
  y = np.random.default_rng(1).normal(size=(5, OUT)).astype(np.float32)
  lr = 0.1
  # PEFT
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
  loss = ((pm(torch.as_tensor(X)) - torch.as_tensor(y)) ** 2).mean()
  loss.backward()
  grads_ref = {
    m: (
      getattr(pm.base_model.model, m).lora_A["default"].weight.grad.numpy().copy(),
      getattr(pm.base_model.model, m).lora_B["default"].weight.grad.numpy().copy(),
    )
    for m in ("fc1", "fc2")
  }
  opt.step()
  # Ours
  trainable, frozen = lora_fn.split(params)

  @jax.jit  # the gradients, an SGD step and the outputs after it: one program
  def step(trainable):
    loss_fn = lambda t: jnp.mean((ours(lora_fn.combine(t, frozen), X) - y) ** 2)
    grads = jax.grad(loss_fn)(trainable)
    trainable = jax.tree.map(lambda p, g: p - lr * g, trainable, grads)
    return grads, ours(lora_fn.combine(trainable, frozen), X)

  grads, after = step(trainable)
  for m in ("fc1", "fc2"):
    g = grads[m]["kernel"]
    np.testing.assert_allclose(g.a, grads_ref[m][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g.b).T, grads_ref[m][1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(after), _theirs(pm), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# PEFT files: the conversion to a plain LoRA, PEFT's unconverted adapters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", True)])
def test_export_is_a_plain_rank_2r_lora_on_the_original_base(tmp_path, init, rslora):
  params0 = lora_fn.wrap(
    _params(_net()),
    rank=R,
    alpha=5.0,
    rslora=rslora,
    targets=("fc1", "fc2"),
    init=init,
    key=K(0),
  )
  trained = randomize_np(params0, 1, scale=0.3)  # "training" moved the factors
  initial = lora_fn.split(params0)[0]  # the trainable half is enough
  lora_fn.save_peft(tmp_path / "a", trained, modules=MODULES, initial=initial)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert config["r"] == 2 * R and config["init_lora_weights"] is True
  assert config["lora_alpha"] == pytest.approx(5.0 * (math.sqrt(2) if rslora else 2))
  assert lora_fn.serving_problems(trained) == []
  pm = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "a")).eval()  # the ORIGINAL base
  np.testing.assert_allclose(_theirs(pm), np.asarray(ours(trained, X)), rtol=1e-5, atol=1e-5)
  # And back: load_peft onto the original base computes the same.
  back = lora_fn.load_peft(tmp_path / "a", _params(_net()), modules=MODULES)
  assert back["fc1"]["kernel"].rank == 2 * R
  np.testing.assert_allclose(ours(back, X), ours(trained, X), rtol=1e-5, atol=1e-5)


def test_export_with_residual_base_is_relative_to_the_residual_base(tmp_path):
  params = randomize_np(
    lora_fn.wrap(_params(_net()), rank=R, targets=("fc1", "fc2"), init="pissa", key=K(0)), 1
  )
  assert params["fc1"]["kernel"].base_init == "pissa"
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, residual_base=True)
  net = _net()
  net.load_state_dict(
    {
      **net.state_dict(),
      **{
        f"{m}.weight": torch.tensor(np.asarray(lora_fn.unwrap(params)[m]["kernel"]).T)
        for m in ("fc1", "fc2")
      },
    }
  )
  pm = peft.PeftModel.from_pretrained(net, str(tmp_path / "a")).eval()
  np.testing.assert_allclose(_theirs(pm), np.asarray(ours(params, X)), rtol=1e-5, atol=1e-5)


def _trained_saved_and_loaded(tmp_path, pm, moved: str):
  """``pm``'s adapter weights named ``*moved*`` moved off their init, saved, read by load_peft.

  Asserts that the loaded adapter on the original base computes what ``pm`` does.
  """
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if moved in name:
        p.add_(0.2 * torch.randn(p.shape, generator=gen))
  pm.save_pretrained(str(tmp_path / "p"))
  params = lora_fn.load_peft(tmp_path / "p", _params(_net()), modules=MODULES)
  np.testing.assert_allclose(np.asarray(ours(params, X)), _theirs(pm.eval()), rtol=1e-5, atol=1e-5)
  return params


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_load_peft_rederives_the_residual_of_an_unconverted_adapter(tmp_path, init):
  params = _trained_saved_and_loaded(tmp_path, _peft_model(init), "lora_")
  saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
  assert saved["init_lora_weights"] == init
  assert params["fc1"]["kernel"].base_init == init  # so save_peft knows the base is a residual


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_inits_that_keep_the_base_load_as_plain_lora(tmp_path, init):
  # PEFT's orthogonal init has B·A = 0 and MiCA's A = 0: the base stays the original one.
  config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["fc1", "fc2"], init_lora_weights=init)
  _trained_saved_and_loaded(tmp_path, peft.get_peft_model(_net(), config), "lora_A")


def test_qpissa_quantises_the_residual():
  params = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), init="pissa", key=K(0))
  q = lora_fn.quantize(params, "nf4", targets=("fc1",), block_size=16)
  assert q["fc1"]["kernel"].is_quantized
  err = np.abs(np.asarray(ours(q, X)) - _theirs(_net())).max()
  plain = lora_fn.quantize(_params(_net()), "nf4", targets=("fc1",), block_size=16)
  # The principal part stays in float: the quantised residual errs less than NF4 of W.
  assert err < np.abs(np.asarray(ours(plain, X)) - _theirs(_net())).max()


# ------------------------------------------------------------------------------------------
# LoftQ
# ------------------------------------------------------------------------------------------


def _kernel(shape=(64, 48), seed=2):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_loftq_beats_plain_nf4_and_improves_with_iterations():
  w = _kernel()
  base = {"fc": {"kernel": w}}
  error = jax.jit(lambda q: jnp.linalg.norm(w - q))
  plain = float(error(dequantize(lora_fn.quantize(base, "nf4", targets=("fc",))["fc"]["kernel"])))
  errors = []
  for iters in (1, 4):
    p = lora_fn.wrap(base, rank=8, targets=("fc",), init="loftq", loftq_iter=iters, key=K(0))
    leaf = p["fc"]["kernel"]
    assert lora_fn.is_quant(leaf.w) and leaf.w.kind == "nf4"
    errors.append(float(error(merged32(leaf))))
  print(
    f"\nLoftQ ||W - (Q + sBA)||_F / ||W - NF4(W)||_F, r=8, 64x48: "
    f"{', '.join(f'{i} iter {e / plain:.4f}' for i, e in zip((1, 4), errors, strict=True))}"
  )
  assert errors[0] < 0.95 * plain
  assert errors[1] <= errors[0]


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_equals_peft_loftq_with_bitsandbytes(iters):
  # PEFT's loftq_init moves the weight to CUDA; this is its loop with the same bitsandbytes
  # calls (Params4bit(compress_statistics=False, quant_type="nf4") quantises with
  # quantize_4bit) and PEFT's own _low_rank_decomposition, on CPU.
  bnb = pytest.importorskip("bitsandbytes")
  from peft.utils.loftq_utils import _low_rank_decomposition

  # Ours (in, out); PyTorch's weight is w.T (out, in). Rows of whole blocks: bitsandbytes'
  # CPU dequantize_4bit (0.50.2) misplaces the scales of blocks that straddle rows.
  w = _kernel((128, 48))
  weight = torch.as_tensor(np.asarray(w).T.copy())
  rank = 4
  res = weight.clone()
  for i in range(iters):
    q, state = bnb.functional.quantize_4bit(
      res, blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    deq = bnb.functional.dequantize_4bit(q, state)
    out = _low_rank_decomposition(weight - deq, reduced_rank=rank)
    if i + 1 < iters:
      res = weight - out["L"] @ out["R"]
  settings = {"double_quant": False, "torch_order": True}
  p = lora_fn.wrap(
    {"fc": {"kernel": w}},
    rank=rank,
    targets=("fc",),
    init="loftq",
    loftq_iter=iters,
    loftq_quant=settings,
    key=K(0),
  )
  leaf = p["fc"]["kernel"]
  if iters == 1:  # bit for bit; after that torch's and LAPACK's SVDs differ in the last bits
    np.testing.assert_array_equal(np.asarray(dequantize(leaf.w)).T, deq.numpy())
  np.testing.assert_allclose(np.asarray(dequantize(leaf.w)).T, deq.numpy(), rtol=1e-5)
  a, b = np.asarray(leaf.a), np.asarray(leaf.b).T
  sign = _signs(a, out["R"].numpy())
  atol = 1e-4  # the residual's spectrum is flat: its singular vectors are ill-conditioned
  np.testing.assert_allclose(a * sign[:, None], out["R"].numpy(), atol=atol)
  np.testing.assert_allclose(b * sign[None, :], out["L"].numpy(), atol=atol)


def test_loftq_exports_against_its_quantised_base_only(tmp_path):
  base = {"fc": {"kernel": _kernel((32, 24))}}
  params = lora_fn.wrap(base, rank=4, targets=("fc",), init="loftq", key=K(0))
  assert params["fc"]["kernel"].base_init == "loftq"
  with pytest.raises(ValueError, match=r"\['fc/kernel'\] were wrapped with init='loftq'"):
    lora_fn.save_peft(tmp_path / "a", params, modules={"fc": "fc"})
  with pytest.raises(
    ValueError,
    match=r"initial= converts PiSSA and OLoRA adapters exactly, but \['fc/kernel'\] are "
    r"LoftQ's, whose quantised base is not W - s·B₀A₀",
  ):
    lora_fn.save_peft(tmp_path / "a", params, modules={"fc": "fc"}, initial=params)
  lora_fn.save_peft(tmp_path / "a", params, modules={"fc": "fc"}, residual_base=True)
  back = lora_fn.load_peft(tmp_path / "a", lora_fn.unwrap(params), modules={"fc": "fc"})
  np.testing.assert_array_equal(back["fc"]["kernel"].a, params["fc"]["kernel"].a)


def test_checkpoints_record_the_changed_base(tmp_path):
  params = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), init="olora", key=K(0))
  lora_fn.save_adapter(tmp_path / "c", params)
  plain = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), key=K(0))
  with pytest.raises(
    ValueError,
    match=r"'fc1/kernel' was saved with base_init='olora' but the model has base_init=None",
  ):
    lora_fn.restore_adapter(tmp_path / "c", plain)


def test_loftq_scales_factors_by_alpha():
  # PEFT's LoftQ leaves the scale out (peft#1982); ours fits s·BA whatever alpha is.
  base = {"fc": {"kernel": _kernel()}}
  merged = [
    merged32(
      lora_fn.wrap(base, rank=8, alpha=a, targets=("fc",), init="loftq", key=K(0))["fc"]["kernel"]
    )
    for a in (8.0, 32.0)
  ]
  np.testing.assert_allclose(merged[0], merged[1], atol=1e-5)


def test_loftq_on_a_stacked_bf16_kernel():
  w = _kernel((2, 32, 24)).astype(jnp.bfloat16)
  p = lora_fn.wrap(
    {"k": w},
    rank=4,
    targets=lambda path, x: True,
    init="loftq",
    layouts={"k": ("stack", "in", "out")},
    key=K(0),
  )
  leaf = p["k"]
  assert leaf.w.dtype == jnp.bfloat16 and (leaf.a.shape, leaf.a.dtype) == ((2, 4, 32), jnp.float32)
  nf4 = lora_fn.quantize({"k": w}, "nf4", targets=lambda path, x: True)["k"]

  @jax.jit
  def errors(leaf, nf4):
    w32 = w.astype(jnp.float32)
    norm = lambda x: jnp.linalg.norm(w32 - x, axis=(1, 2))
    return norm(leaf.merged(jnp.float32)), norm(nf4.dequantize(jnp.float32))

  ours, plain = errors(leaf, nf4)
  assert (ours < plain).all()  # each layer


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

_BASE = {"fc": {"kernel": jnp.ones((6, 5))}}


@pytest.mark.parametrize(
  ("params", "kwargs", "error", "match"),
  [
    (_BASE, {"init": "svd"}, ValueError, r"init must be one of \('kaiming', 'gaussian', 'pissa'"),
    (_BASE, {"init": "pissa_niter_x"}, ValueError, "pissa_niter_<K>"),
    (_BASE, {"init": "pissa", "loftq_iter": 2}, ValueError, "loftq_iter applies to init='loftq'"),
    (_BASE, {"init": "loftq", "loftq_iter": 0}, ValueError, "loftq_iter must be a positive int"),
    (
      _BASE,
      {"init": "loftq", "loftq_quant": {"kind": "int8"}},
      ValueError,
      "loftq_quant must be a mapping with keys among",
    ),
    (_BASE, {"init": "loftq", "loftq_quant": {"block_size": 48}}, ValueError, "power of two"),
    (
      lora_fn.quantize(_BASE, "nf4", targets=("fc",)),
      {"init": "pissa"},
      ValueError,
      r"init='pissa' needs the float weight, but the base at 'fc/kernel' is already quantised",
    ),
    (
      lora_fn.quantize(_BASE, "int8", targets=("fc",)),
      {"init": "olora"},
      ValueError,
      r"quantised \(int8\)",
    ),
    (
      lora_fn.quantize(_BASE, "nf4", targets=("fc",)),
      {"init": "loftq"},
      ValueError,
      "LoftQ quantises the float base itself: pass the unquantised params",
    ),
  ],
)
def test_wrap_errors(params, kwargs, error, match):
  with pytest.raises(error, match=match):
    lora_fn.wrap(params, rank=2, targets=("fc",), key=K(0), **kwargs)


def test_export_errors(tmp_path):
  params = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1", "fc2"), init="pissa", key=K(0))
  with pytest.raises(
    ValueError,
    match=r"save_peft: \['fc1/kernel', 'fc2/kernel'\] were wrapped with init='pissa', so their "
    r"base is not the original kernel any more .* Pass initial=<the tree wrap returned, before "
    r"training> .* or residual_base=True",
  ):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES)
  with pytest.raises(ValueError, match=r"initial= writes .* residual_base=True .* pass one"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, initial=params, residual_base=True)
  with pytest.raises(TypeError, match=r"residual_base must be a bool; got: 'yes'"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, residual_base="yes")
  plain = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1", "fc2"), key=K(0))
  with pytest.raises(ValueError, match=r"initial at 'fc1/kernel' .*init None\) is not the start"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, initial=plain)
  other = lora_fn.wrap(_params(_net()), rank=2, targets=("fc1", "fc2"), init="pissa", key=K(0))
  with pytest.raises(ValueError, match=r"initial at 'fc1/kernel' \(rank 2.*is not the start"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, initial=other)
  only_fc1 = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), init="pissa", key=K(0))
  with pytest.raises(ValueError, match=r"initial has no LoRA leaf at \['fc2/kernel'\]"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, initial=only_fc1)
  with pytest.raises(ValueError, match="initial holds no LoRA leaf"):
    lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, initial=_params(_net()))


def test_load_errors(tmp_path):
  pm = _peft_model("pissa_niter_2")
  pm.save_pretrained(str(tmp_path / "niter"))
  with pytest.raises(
    ValueError,
    match=r"init_lora_weights='pissa_niter_2': the adapter is relative to the base that init "
    r"made, the residual of torch's randomized SVD.*path_initial_model_for_weight_conversion",
  ):
    lora_fn.load_peft(tmp_path / "niter", _params(_net()), modules=MODULES)
  config = json.loads((tmp_path / "niter" / "adapter_config.json").read_text())
  (tmp_path / "niter" / "adapter_config.json").write_text(
    json.dumps({**config, "init_lora_weights": "loftq"})
  )
  with pytest.raises(
    ValueError,
    match=r"init_lora_weights='loftq': .* LoftQ's quantised weight .* or load it onto the base "
    r"it was trained on, saved from PEFT, with init_lora_weights set to true",
  ):
    lora_fn.load_peft(tmp_path / "niter", _params(_net()), modules=MODULES)
  _peft_model("pissa").save_pretrained(str(tmp_path / "p"))
  wrapped = lora_fn.wrap(_params(_net()), rank=R, alpha=5.0, targets=("fc1", "fc2"), key=K(0))
  with pytest.raises(ValueError, match="must be the original kernel, not a LoRA leaf"):
    lora_fn.load_peft(tmp_path / "p", wrapped, modules=MODULES)
  q = lora_fn.quantize(_params(_net()), "nf4", targets=("fc1",), block_size=16)
  with pytest.raises(ValueError, match="already quantised"):
    lora_fn.load_peft(tmp_path / "p", q, modules=MODULES)


def test_copy_of_a_wrapped_tree_is_a_valid_initial(tmp_path):
  # JAX arrays are immutable: keeping the tree wrap returned costs only its factors.
  params0 = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), init="olora", key=K(0))
  initial = copy.copy(params0)
  lora_fn.save_peft(tmp_path / "a", randomize_np(params0, 2), modules=MODULES, initial=initial)
