"""AdaLoRA (``lorax_fn/_adalora.py``) against PEFT's ``SVDLinear`` and ``RankAllocator``.

A tiny torch model (two ``Linear`` layers of pairwise-distinct sizes) and its JAX twin with
the same factors: forward, gradients, importance EMAs, masks and parameters agree step by
step through the warm-up, the budget's fall and the fixed final phase.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_fn as lora_fn
from lorax_fn import _adalora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

K = jax.random.key
D, HID, OUT, R = 11, 13, 7, 4
MODULES = {"fc1": "fc1", "fc2": "fc2"}
SCHEDULE = dict(init_r=R, target_r=2, total_step=8, tinit=1, tfinal=2)


@dataclasses.dataclass
class Out:  # AdaLoraModel adds the orthogonality term to outputs.loss
  loss: torch.Tensor
  logits: torch.Tensor


class TorchNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc1 = torch.nn.Linear(D, HID)
    self.fc2 = torch.nn.Linear(HID, OUT)

  def forward(self, x, y=None):
    out = self.fc2(torch.tanh(self.fc1(x)))
    return Out(None if y is None else ((out - y) ** 2).mean(), out)


def _net():
  torch.manual_seed(0)
  return TorchNet()


def _params(net):
  sd = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
  return {
    m: {"kernel": jnp.asarray(sd[f"{m}.weight"].T), "bias": jnp.asarray(sd[f"{m}.bias"])}
    for m in ("fc1", "fc2")
  }


def model(params, x):
  h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


apply = jax.jit(lora_fn.lora(model))
RNG = np.random.default_rng(0)
X = RNG.normal(size=(5, D)).astype(np.float32)
Y = RNG.normal(size=(5, OUT)).astype(np.float32)


def _twins(**config):
  """PEFT's AdaLoRA model (Λ made non-zero) and our params holding its factors."""
  pm = peft.get_peft_model(
    _net(),
    peft.AdaLoraConfig(lora_alpha=6, target_modules=["fc1", "fc2"], **{**SCHEDULE, **config}),
  )
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_E" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  params = lora_fn.wrap(
    _params(_net()), rank=R, alpha=6.0, targets=("fc1", "fc2"), key=K(0), adalora=True
  )
  for m in ("fc1", "fc2"):
    layer = getattr(pm.base_model.model, m)
    get = lambda t: jnp.asarray(t.detach().numpy().copy())
    params[m]["kernel"] = dataclasses.replace(
      params[m]["kernel"],
      a=get(layer.lora_A["default"]),
      b=get(layer.lora_B["default"]).T,
      e=get(layer.lora_E["default"])[:, 0],
    )
  return pm, params


def _peft_factor(pm, m, f, grad=False):
  t = getattr(getattr(pm.base_model.model, m), f"lora_{f.upper()}")["default"]
  t = (t.grad if grad else t).detach().numpy()
  return {"a": t, "b": t.T, "e": t[:, 0]}[f]


def test_wrap_gives_peft_init_and_a_low_rank_forward():
  params = lora_fn.wrap(_params(_net()), rank=R, targets=("fc1",), key=K(0), adalora=True)
  leaf = params["fc1"]["kernel"]
  assert (leaf.a.shape, leaf.b.shape, leaf.e.shape) == ((R, D), (R, HID), (R,))
  assert not np.asarray(leaf.e).any() and 0.01 < float(np.std(leaf.a)) < 0.03
  # Low-rank: W·x + s·B·((Λ ⊙ A)·x); nothing of the kernel's size is formed.
  jaxpr = jax.make_jaxpr(apply)(params, X).jaxpr
  made = [e for e in jaxpr.eqns if e.primitive.name != "stop_gradient"]  # (of the base)
  shapes = [tuple(v.aval.shape) for e in made for v in e.outvars]
  assert (D, HID) not in shapes and (HID, D) not in shapes
  summary = lora_fn.summary(params)
  assert f"{R * D + R * HID + R:,}" in summary  # a, b and e count


def test_forward_and_gradients_equal_peft():
  pm, params = _twins()
  out = pm.base_model(torch.as_tensor(X), torch.as_tensor(Y))
  np.testing.assert_allclose(
    np.asarray(apply(params, X)), out.logits.detach().numpy(), rtol=1e-5, atol=1e-6
  )
  merged = jax.jit(lambda p: model(lora_fn.merge(p), X))(params)
  np.testing.assert_allclose(merged, out.logits.detach().numpy(), rtol=1e-5, atol=1e-6)
  out.loss.backward()  # the task loss plus PEFT's orthogonality term
  trainable, frozen = lora_fn.split(params)
  reg = lambda t: _adalora.orth_reg(
    {f"{m}/kernel": (t[m]["kernel"].a, t[m]["kernel"].b) for m in MODULES},
    {f"{m}/kernel": 0 for m in MODULES},
  )
  loss = lambda t: jnp.mean((apply(lora_fn.combine(t, frozen), X) - Y) ** 2) + 0.5 * reg(t)
  grads = jax.jit(jax.grad(loss))(trainable)
  for m in MODULES:
    for f in "abe":
      np.testing.assert_allclose(
        getattr(grads[m]["kernel"], f), _peft_factor(pm, m, f, grad=True), rtol=1e-5, atol=1e-7
      )


def test_budget_schedule_equals_peft():
  pm, _ = _twins(total_step=20, tinit=3, tfinal=4, deltaT=3)
  allocator = pm.base_model.rankallocator
  for step in range(22):
    ours = _adalora.budget_schedule(
      step, init_bgt=2 * R, target_bgt=2 * 2, tinit=3, tfinal=4, total_step=20, deltaT=3
    )
    assert ours == allocator.budget_schedule(step), step


@pytest.mark.parametrize("deltaT", [1, 2])
def test_scores_masks_and_steps_equal_peft_rank_allocator(deltaT):
  pm, params = _twins(deltaT=deltaT)
  allocator = pm.base_model.rankallocator
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
  tx = lora_fn.adalora(optax.sgd(0.5), **SCHEDULE, deltaT=deltaT)
  trainable, frozen = lora_fn.split(params)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    grads = jax.grad(lambda t: jnp.mean((apply(lora_fn.combine(t, frozen), X) - Y) ** 2))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state

  masked_any = False
  for t in range(10):
    pm.base_model(torch.as_tensor(X), torch.as_tensor(Y)).loss.backward()
    opt.step()
    pm.base_model.update_and_allocate(t)
    opt.zero_grad()
    trainable, state = step(trainable, state)
    pattern = pm.peft_config["default"].rank_pattern
    for m in MODULES:
      path = f"{m}/kernel"
      for f in "abe":
        np.testing.assert_allclose(
          getattr(trainable[m]["kernel"], f),
          _peft_factor(pm, m, f),
          rtol=1e-5,
          atol=1e-6,
          err_msg=f"step {t} {m} {f}",
        )
        name = f"{m}.lora_{f.upper()}.default"
        if t < 8 - 2:  # PEFT forgets the scores once the ranks are fixed
          ref = {"a": lambda x: x, "b": lambda x: x.T, "e": lambda x: x[:, 0]}[f]
          for mine, theirs in (
            (state.exp_avg_ipt, allocator.exp_avg_ipt),
            (state.exp_avg_unc, allocator.exp_avg_unc),
          ):
            np.testing.assert_allclose(
              mine[path][f],
              ref(theirs[name].numpy()),
              rtol=1e-5,
              atol=1e-12,
              err_msg=f"step {t} {m} {f}",
            )
      if pattern:
        np.testing.assert_array_equal(state.mask[path], pattern[f"{m}.lora_E.default"])
        masked_any = True
  assert masked_any
  ranks = lora_fn.adalora_ranks(state)
  assert sum(ranks.values()) == 2 * 2  # target_r per matrix on average
  assert ranks == lora_fn.adalora_ranks(lora_fn.combine(trainable, frozen))


def test_ranks_fall_on_the_cubic_schedule_and_stacked_layers_are_matrices():
  # A scan-stacked kernel of 2 layers and its unrolled twin prune alike: each layer is a
  # matrix of the budget, as each is a module in PyTorch.
  rng = np.random.default_rng(1)
  w, a, b = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 5))
  e = rng.normal(size=(2, 4))
  leaf = lambda i, roles: lora_fn.LoraLeaf(
    *(np.asarray(t if i is None else t[i], np.float32) for t in (w, a, b)),
    roles,
    4,
    4.0,
    e=np.asarray(e if i is None else e[i], np.float32),
  )
  stacked = {"k": leaf(None, ("stack", "in", "out"))}
  unrolled = {f"k{i}": leaf(i, ("in", "out")) for i in range(2)}
  x = np.asarray(rng.normal(size=(3, 6)), np.float32)
  f_s = lambda p: jnp.einsum("bi,lio->lbo", x, p["k"].merged())
  f_u = lambda p: jnp.stack([x @ p["k0"].merged(), x @ p["k1"].merged()])
  settings = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, orth_reg_weight=0.1)
  runs = []
  for params, f in ((stacked, f_s), (unrolled, f_u)):
    tx = lora_fn.adalora(optax.adam(0.05), **settings)
    trainable, frozen = lora_fn.split(params)

    @jax.jit
    def steps(trainable, f=f, frozen=frozen, tx=tx):
      def one(carry, _):
        trainable, state = carry
        g = jax.grad(lambda t: jnp.sum(jnp.sin(f(lora_fn.combine(t, frozen)))))(trainable)
        u, state = tx.update(g, state, trainable)
        return (optax.apply_updates(trainable, u), state), state.mask

      return jax.lax.scan(one, (trainable, tx.init(trainable)), length=8)

    (trainable, state), masks = steps(trainable)
    runs.append(
      (jax.tree.map(lambda m: np.asarray(m).sum(-1), masks), lora_fn.adalora_ranks(state))
    )
  (m_s, r_s), (m_u, r_u) = runs
  np.testing.assert_array_equal(m_s["k"], np.stack([m_u["k0"], m_u["k1"]], axis=1))
  np.testing.assert_array_equal(r_s["k"], [r_u["k0"], r_u["k1"]])
  budget = [int(m_s["k"][t].sum()) for t in range(8)]
  expected = [
    _adalora.budget_schedule(
      t, init_bgt=8, target_bgt=4, tinit=1, tfinal=2, total_step=8, deltaT=1
    )[0]
    for t in range(8)
  ]
  assert budget[:6] == expected[:6] and budget[6:] == [4, 4]  # fixed after total - tfinal


def test_optimizer_split_and_checkpoint_records_carry_e():
  from lorax_fn._checkpoint import adapter_state
  from lorax_fn._restore import load_adapter_state

  _, params = _twins()
  tx = lora_fn.adalora(lora_fn.optimizer(optax.sgd(1e-2), params), **SCHEDULE)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum(apply(p, X) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  moved, _ = step(params, tx.init(params))
  assert lora_fn.trainable_mask(moved)["fc1"]["kernel"].e is True
  assert not np.array_equal(moved["fc1"]["kernel"].e, params["fc1"]["kernel"].e)
  # What save_adapter writes and restore_adapter reads: e included and checked.
  arrays, record = adapter_state(moved)
  assert record["lora"]["fc1/kernel"]["adalora"] is True
  back = load_adapter_state(params, arrays)
  np.testing.assert_array_equal(back["fc1"]["kernel"].e, moved["fc1"]["kernel"].e)
  plain = lora_fn.wrap(_params(_net()), rank=R, alpha=6.0, targets=("fc1", "fc2"), key=K(5))
  with pytest.raises(ValueError, match="adalora=True but the model has adalora=False"):
    lora_fn.check_adapter_config(record, lora_fn.adapter_config(plain))


def test_peft_files_both_ways(tmp_path):
  pm, params = _twins()
  tx = lora_fn.adalora(optax.sgd(0.5), **SCHEDULE)
  trainable, frozen = lora_fn.split(params)
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state):
    g = jax.grad(lambda t: jnp.mean((apply(lora_fn.combine(t, frozen), X) - Y) ** 2))(trainable)
    u, state = tx.update(g, state, trainable)
    return optax.apply_updates(trainable, u), state

  for _ in range(6):  # into the final phase: two triplets per matrix pruned
    trainable, state = step(trainable, state)
  params = lora_fn.combine(trainable, frozen)
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, adalora=SCHEDULE)
  config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
  assert (config["peft_type"], config["init_r"], config["target_r"]) == ("ADALORA", R, 2)
  assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {
    f"{m}.lora_E": r for m, r in zip(MODULES, lora_fn.adalora_ranks(state).values(), strict=True)
  }
  assert any("AdaLoRA" in p for p in lora_fn.serving_problems(params))
  with warnings.catch_warnings():  # PEFT warns about its own AdaLoRA rank_pattern keys
    warnings.filterwarnings("ignore", "The following rank_pattern keys", RuntimeWarning)
    loaded = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "a")).eval()
  with torch.no_grad():
    theirs = loaded(torch.as_tensor(X)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(apply(params, X)), rtol=1e-5, atol=1e-6)
  back = lora_fn.load_peft(tmp_path / "a", _params(_net()), modules=MODULES)
  assert back["fc1"]["kernel"].rank == R and back["fc1"]["kernel"].e is not None
  np.testing.assert_allclose(apply(back, X), apply(params, X), rtol=1e-6, atol=1e-7)
  # PEFT's own save of an AdaLoRA model reads too.
  pm.save_pretrained(str(tmp_path / "p"))
  back = lora_fn.load_peft(tmp_path / "p", _params(_net()), modules=MODULES)
  with torch.no_grad():
    theirs = pm.eval()(torch.as_tensor(X)).logits.numpy()
  np.testing.assert_allclose(np.asarray(apply(back, X)), theirs, rtol=1e-5, atol=1e-6)


def test_save_before_any_step_writes_init_r_triplets_as_peft(tmp_path):
  # Every e is 0 until the first step: nothing is pruned yet (PEFT's rank_pattern is None).
  params = lora_fn.wrap(
    _params(_net()), rank=R, alpha=6.0, targets=("fc1", "fc2"), key=K(0), adalora=True
  )
  assert lora_fn.adalora_ranks(params) == {"fc1/kernel": R, "fc2/kernel": R}
  lora_fn.save_peft(tmp_path / "a", params, modules=MODULES, adalora=SCHEDULE)
  pm = peft.get_peft_model(
    _net(), peft.AdaLoraConfig(lora_alpha=6, target_modules=["fc1", "fc2"], **SCHEDULE)
  )
  pm.save_pretrained(str(tmp_path / "p"))
  from safetensors.numpy import load_file

  ours, theirs = (
    (
      json.loads((tmp_path / d / "adapter_config.json").read_text()),
      {k: v.shape for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()},
    )
    for d in ("a", "p")
  )
  assert ours[0]["rank_pattern"] is None and theirs[0]["rank_pattern"] is None
  assert ours[1] == theirs[1]  # lora_A (R, in), lora_B (out, R), lora_E (R, 1)
  loaded = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "a")).eval()
  with torch.no_grad():
    out = loaded(torch.as_tensor(X)).logits.numpy()
  np.testing.assert_allclose(out, np.asarray(apply(_params(_net()), X)), rtol=1e-5, atol=1e-6)
  back = lora_fn.load_peft(tmp_path / "a", _params(_net()), modules=MODULES)
  assert back["fc1"]["kernel"].e.shape == (R,)
  np.testing.assert_array_equal(back["fc1"]["kernel"].a, params["fc1"]["kernel"].a)


def test_optimizer_states_name_the_adalora_mix_up():
  plain = lora_fn.wrap({"fc": {"kernel": jnp.ones((6, 5))}}, rank=4, targets=("fc",), key=K(0))
  tx = lora_fn.optimizer(optax.sgd(0.1), plain)
  with pytest.raises(
    ValueError,
    match=r"updates at 'fc/kernel' is an AdaLoRA leaf \(with singular values e: "
    r"wrap\(..., adalora=True\)\); the optimizer was built for a plain LoRA leaf",
  ):
    tx.update(_P, tx.init(plain))
  inner = lora_fn.optimizer(optax.sgd(0.1), _P)
  ada = lora_fn.adalora(inner, init_r=4, target_r=2, total_step=10)
  with pytest.raises(
    TypeError,
    match=r"got: AdaLoraState \(an AdaLoraState is the state of lorax_fn.adalora\(tx, ...\), "
    r"which runs this optimizer inside: call the adalora transformation's update with it\)",
  ):
    inner.update(_P, ada.init(_P), _P)
  with pytest.raises(
    TypeError, match=r"state must be the AdaLoraState that this adalora transformation's init"
  ):
    ada.update(_P, inner.init(_P), _P)
  other = {"gc": _P["fc"]}
  with pytest.raises(
    ValueError,
    match=r"state holds AdaLoRA scores for \['fc/kernel'\] but params have AdaLoRA leaves at "
    r"\['gc/kernel'\]",
  ):
    lora_fn.adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10).update(
      other, ada.init(_P), other
    )


_P = lora_fn.wrap(
  {"fc": {"kernel": jnp.ones((6, 5))}}, rank=4, targets=("fc",), key=K(0), adalora=True
)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"target_r": 5}, r"target_r must be at most init_r = 4; got: 5"),
    ({"tinit": 6, "tfinal": 4}, r"tinit must be below total_step - tfinal = 6 \(a pruning phase\)"),
    ({"beta1": 1.0}, r"beta1 must be in \(0, 1\); got: 1.0"),
    ({"orth_reg_weight": -1}, r"orth_reg_weight must be a number >= 0"),
    ({"deltaT": 0}, r"deltaT must be a positive int; got: 0"),
    ({"tfinal": -1}, r"tfinal must be an int >= 0; got: -1"),
  ],
)
def test_adalora_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lora_fn.adalora(optax.sgd(0.1), **{"init_r": 4, "target_r": 2, "total_step": 10, **kwargs})


def test_init_and_wrap_errors(tmp_path):
  tx = lora_fn.adalora(optax.sgd(0.1), init_r=3, target_r=2, total_step=10)
  with pytest.raises(ValueError, match=r"the AdaLoRA leaf at 'fc/kernel' has rank 4; init_r is 3"):
    tx.init(_P)
  plain = lora_fn.wrap({"fc": {"kernel": jnp.ones((6, 5))}}, rank=3, targets=("fc",), key=K(0))
  with pytest.raises(ValueError, match=r"params hold no AdaLoRA leaf; wrap them"):
    tx.init(plain)
  tx = lora_fn.adalora(optax.sgd(0.1), init_r=4, target_r=2, total_step=10)
  with pytest.raises(ValueError, match="adalora's update needs params"):
    tx.update(_P, tx.init(_P))
  base = {"fc": {"kernel": jnp.ones((6, 5))}}
  for kwargs, got in (
    ({"dora": True}, "dora=True"),
    ({"init": "pissa"}, "init='pissa'"),
    ({"rslora": True}, "rslora=True"),
  ):
    with pytest.raises(ValueError, match=f"adalora=True has its own init and scale.*got {got}"):
      lora_fn.wrap(base, rank=2, targets=("fc",), key=K(0), adalora=True, **kwargs)
  with pytest.raises(ValueError, match="stack_adapters stacks plain LoRA factors only"):
    lora_fn.stack_adapters([_P, _P])
  with pytest.raises(ValueError, match="adalora= records AdaLoRA's settings, but params hold no"):
    lora_fn.save_peft(tmp_path / "x", plain, modules={"fc": "fc"}, adalora={"target_r": 2})
  with pytest.raises(ValueError, match=r"adalora must be a mapping with keys among"):
    lora_fn.save_peft(tmp_path / "x", _P, modules={"fc": "fc"}, adalora={"lr": 2})
  embed = lora_fn.wrap(
    {"embed": {"embedding": jnp.ones((11, 6))}}, rank=2, targets=("embed",), key=K(0), adalora=True
  )
  with pytest.raises(
    ValueError,
    match=r"save_peft: the AdaLoRA leaves at \['embed/embedding'\] are not Linear or Conv2d "
    r"layers; PEFT's AdaLoRA adapts only those",
  ):
    lora_fn.save_peft(tmp_path / "e", embed, modules={"embed": "embed"})
