"""``lora(fn)`` against ``fn(merge(params))`` and the explicit formula, per kernel kind."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, assert_trees_equal, explicit_merge, randomize

import lorax_fn as lora_fn

K = jax.random.key


def _linen(module, *inputs, method=None):
  params = module.init(K(0), *inputs, method=method)
  return (lambda p, *xs: module.apply(p, *xs, method=method)), params


class _Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    e = nn.Embed(13, 7)
    return e.attend(e(ids) * 2.0)


class _Stacked(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(5)(h)), None

    scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan()(x, None)[0]


def _case(name):
  x = jax.random.normal(K(1), (2, 3, 5))
  if name == "dense":
    return (*_linen(nn.Dense(7), x), (x,), ("kernel",), None)
  if name == "dense_general_in":  # (in, heads, head_dim), like attention q/k/v
    return (
      *_linen(nn.DenseGeneral((2, 3), axis=-1), x),
      (x,),
      ("kernel",),
      {"kernel": ("in", "out", "out")},
    )
  if name == "dense_general_out":  # (heads, head_dim, out), like the attention output
    x4 = jax.random.normal(K(1), (2, 3, 2, 5))
    return (
      *_linen(nn.DenseGeneral(7, axis=(-2, -1)), x4),
      (x4,),
      ("kernel",),
      {"kernel": ("in", "in", "out")},
    )
  if name == "einsum":
    m = nn.Einsum((5, 2, 7), "btd,dhk->bthk")
    return (*_linen(m, x), (x,), ("kernel",), {"kernel": ("in", "out", "out")})
  if name == "einsum_two_contracting":
    x4 = jax.random.normal(K(1), (2, 3, 2, 11))
    m = nn.Einsum((2, 11, 7), "bthd,hdk->btk")
    return (*_linen(m, x4), (x4,), ("kernel",), {"kernel": ("in", "in", "out")})
  if name == "conv2d":
    img = jax.random.normal(K(1), (2, 11, 13, 5))
    m = nn.Conv(7, (3, 2), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2))
    return (*_linen(m, img), (img,), ("kernel",), None)
  if name == "conv1d":
    seq = jax.random.normal(K(1), (2, 11, 5))
    return (*_linen(nn.Conv(7, (3,)), seq), (seq,), ("kernel",), {"kernel": ("in", "in", "out")})
  if name == "embed":
    ids = jnp.array([[0, 3, 12], [5, 5, 1]])
    return (*_linen(_Embed(), ids), (ids,), ("Embed_0",), None)
  if name == "scan_stacked":
    return (*_linen(_Stacked(), x), (x,), ("Dense_0",), {"Dense_0": ("stack", "in", "out")})
  if name == "vmap_stacked":  # the layer axis meets dot_general as a batch dimension
    params = {"w": jax.random.normal(K(0), (3, 5, 7))}
    fn = lambda p, xs: jax.vmap(lambda w, h: h @ w)(p["w"], xs)
    xs = jax.random.normal(K(1), (3, 2, 5))
    return fn, params, (xs,), ("w",), {"w": ("stack", "in", "out")}
  if name == "kernel_on_left":
    params = {"w": jax.random.normal(K(0), (5, 7))}
    fn = lambda p, x: jnp.einsum("io,bti->obt", p["w"], x)
    return fn, params, (x,), ("w",), None
  if name == "transposed_reshaped":
    params = {"w": jax.random.normal(K(0), (7, 2, 3))}  # (out, heads, head_dim) stored

    def fn(p, x):
      return x.reshape(2, 3, 6) @ jnp.transpose(p["w"], (1, 2, 0)).reshape(6, 7)

    xs = jax.random.normal(K(1), (2, 3, 2, 3))
    return fn, params, (xs,), ("w",), {"w": ("out", "in", "in")}
  raise KeyError(name)


CASES = [
  "dense",
  "dense_general_in",
  "dense_general_out",
  "einsum",
  "einsum_two_contracting",
  "conv2d",
  "conv1d",
  "embed",
  "scan_stacked",
  "vmap_stacked",
  "kernel_on_left",
  "transposed_reshaped",
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", CASES)
def test_lora_matches_merge_and_formula(name, jit):
  fn, params, inputs, targets, layouts = _case(name)
  wrapped = randomize(
    lora_fn.wrap(params, rank=2, alpha=3.0, targets=targets, layouts=layouts, key=K(2)), K(3)
  )
  run = lora_fn.lora(fn)
  with _no_materialize():
    out = (jax.jit(run) if jit else run)(wrapped, *inputs)
  assert_trees_close(out, fn(lora_fn.merge(wrapped), *inputs))
  assert_trees_close(out, fn(explicit_merge(wrapped), *inputs))
  # The low-rank part is really there.
  assert not np.allclose(out, fn(lora_fn.unwrap(wrapped), *inputs), atol=1e-3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", CASES)
def test_freshly_wrapped_equals_base(name, jit):
  fn, params, inputs, targets, layouts = _case(name)
  wrapped = lora_fn.wrap(params, rank=2, targets=targets, layouts=layouts, key=K(2))
  assert_trees_equal(lora_fn.merge(wrapped), params)
  maybe_jit = jax.jit if jit else (lambda f: f)
  got = maybe_jit(lora_fn.lora(fn))(wrapped, *inputs)
  want = maybe_jit(fn)(params, *inputs)
  if jit or name == "scan_stacked":
    # Compiled, the low-rank term (exactly zero) can change how XLA fuses the base matmul
    # with a following bias add, which may move the last bit.
    assert_trees_close(got, want, rtol=1e-6)
  else:
    assert_trees_equal(got, want)


def test_bf16_compute_follows_the_model_cast():
  params = {"w": jax.random.normal(K(0), (11, 7))}
  fn = lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
  wrapped = randomize(lora_fn.wrap(params, rank=3, targets=("w",), key=K(1)), K(2))
  x = jax.random.normal(K(3), (5, 11))
  with _no_materialize():
    got = jax.jit(lora_fn.lora(fn))(wrapped, x)
  assert got.dtype == jnp.bfloat16
  assert_trees_close(
    got.astype(jnp.float32), fn(explicit_merge(wrapped), x).astype(jnp.float32), rtol=2e-2
  )


@pytest.mark.parametrize("name", ["dense", "conv2d", "embed", "scan_stacked", "einsum"])
def test_gradients_match_merged(name):
  fn, params, inputs, targets, layouts = _case(name)
  wrapped = randomize(
    lora_fn.wrap(params, rank=2, targets=targets, layouts=layouts, key=K(2)), K(3)
  )
  trainable, frozen = lora_fn.split(wrapped)

  def loss(apply, t):
    return jnp.sum(jnp.sin(apply(lora_fn.combine(t, frozen), *inputs)))

  got = jax.jit(jax.grad(lambda t: loss(lora_fn.lora(fn), t)))(trainable)
  want = jax.grad(lambda t: loss(lambda p, *xs: fn(lora_fn.merge(p), *xs), t))(trainable)
  assert_trees_close(got, want, rtol=1e-4)


def test_higher_order_primitives():
  params = {"w": jax.random.normal(K(0), (5, 5))}

  def fn(p, x, i):
    w = p["w"]
    h = jax.checkpoint(lambda h: jnp.tanh(h @ w))(x)
    h = jax.lax.cond(i > 0, lambda h: h @ w, lambda h: -(h @ w.T), h)
    h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, h))[1]
    h = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), h, None, length=2)[0]
    return jax.jit(lambda h: h @ w)(h)

  wrapped = randomize(lora_fn.wrap(params, rank=2, targets=("w",), key=K(1)), K(2))
  x = jax.random.normal(K(3), (3, 5))
  for i in (0, 1):
    with _no_materialize():
      got = jax.jit(lora_fn.lora(fn))(wrapped, x, i)
    assert_trees_close(got, fn(lora_fn.merge(wrapped), x, i))


def test_jaxpr_has_no_full_size_update():
  fn, params, inputs, targets, layouts = _case("dense_general_in")
  wrapped = lora_fn.wrap(params, rank=2, targets=targets, layouts=layouts, key=K(2))
  jaxpr = jax.make_jaxpr(lora_fn.lora(fn))(wrapped, *inputs)
  kernel_shape = params["params"]["kernel"].shape
  produced = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
  # The only kernel-shaped value is the stop_gradient of the base itself.
  assert produced.count(kernel_shape) == 1


def test_unsupported_use_materializes_with_warning():
  params = {"w": jax.random.normal(K(0), (5, 7))}
  fn = lambda p, x: x @ jnp.sin(p["w"])
  wrapped = randomize(lora_fn.wrap(params, rank=2, targets=("w",), key=K(1)), K(2))
  x = jax.random.normal(K(3), (3, 5))
  with pytest.warns(lora_fn.MaterializeWarning, match=r"no factored rule for 'sin'"):
    got = lora_fn.lora(fn)(wrapped, x)
  assert_trees_close(got, fn(lora_fn.merge(wrapped), x))


def test_dropout_is_keyed_and_off_without_key():
  params = {"w": jax.random.normal(K(0), (5, 7))}
  fn = lambda p, x: x @ p["w"]
  # rank 5 = in: x -> x·A·B is injective, so the dropped-out input can be read back.
  wrapped = randomize(lora_fn.wrap(params, rank=5, targets=("w",), key=K(1), dropout=0.5), K(2))
  x = jax.random.normal(K(3), (13, 5))
  leaf = wrapped["w"]
  base = x @ leaf.w
  low = lambda xd: (xd @ leaf.a.T) @ leaf.b * leaf.scale
  apply = lora_fn.lora(fn)
  assert_trees_close(apply(wrapped, x), base + low(x))
  a = apply(wrapped, x, dropout_key=K(4))
  b = jax.jit(apply)(wrapped, x, dropout_key=K(4))
  c = apply(wrapped, x, dropout_key=K(5))
  assert_trees_close(a, b)
  assert not np.allclose(a, c)
  # The base path never sees dropout: a - base is low(mask * x / (1 - p)).
  resid = np.asarray(a - base)
  xd = np.linalg.lstsq(np.asarray(leaf.a.T @ leaf.b * leaf.scale).T, resid.T, rcond=None)[0].T
  dropped = np.isclose(xd, 0, atol=1e-3)
  assert 0.3 < dropped.mean() < 0.7
  np.testing.assert_allclose(xd[~dropped], 2 * np.asarray(x)[~dropped], rtol=1e-2, atol=1e-3)


def test_one_transform_serves_every_dropout_key_without_retracing():
  traces = []

  def fn(p, x):
    traces.append(1)
    return x @ p["w"]

  wrapped = randomize(
    lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0), dropout=0.5), K(1)
  )
  x = jax.random.normal(K(2), (11, 5))
  apply = lora_fn.lora(fn)
  outs = [apply(wrapped, x, dropout_key=K(i)) for i in range(3)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
  step = jax.jit(lambda p, x, k: apply(p, x, dropout_key=k))
  assert_trees_close(step(wrapped, x, K(1)), outs[1])
  step(wrapped, x, K(7))
  assert step._cache_size() == 1


def test_key_at_build_time_is_deprecated_but_still_applies_dropout():
  fn = lambda p, x: x @ p["w"]
  wrapped = randomize(
    lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0), dropout=0.5), K(1)
  )
  x = jax.random.normal(K(2), (11, 5))
  with pytest.warns(DeprecationWarning, match=r"pass dropout_key=k to the transformed function"):
    old = lora_fn.lora(fn, key=K(3))
  assert_trees_equal(old(wrapped, x), lora_fn.lora(fn)(wrapped, x, dropout_key=K(3)))


def test_trace_cache_is_least_recently_used_and_reads_closures_like_jit(monkeypatch):
  import lorax_fn._transform as transform

  monkeypatch.setattr(transform, "_CACHE_SIZE", 6)  # the rule, on a cache small to fill
  traces = []
  scale = {"value": 2.0}

  def fn(p, x):
    traces.append(x.shape)
    return scale["value"] * (x @ p["w"])

  wrapped = lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0))
  apply = lora_fn.lora(fn)
  hot = jnp.ones((1, 5))
  for n in range(2, 12):  # more shapes than the cache holds; the hot one is used throughout
    apply(wrapped, hot)
    apply(wrapped, jnp.ones((n, 5)))
  assert traces.count((1, 5)) == 1
  first = len(traces)
  apply(wrapped, jnp.ones((2, 5)))  # the oldest cold shape was evicted
  assert len(traces) == first + 1
  # As with jax.jit, a closed-over value is read when fn is traced; a cached trace keeps it.
  scale["value"] = 3.0
  assert_trees_close(apply(wrapped, hot), 2.0 * (hot @ wrapped["w"].w))


def test_only_the_rules_own_signal_falls_back_to_materialising(monkeypatch):
  import lorax_fn._rules as rules

  def broken(*args, **kwargs):
    raise NotImplementedError("a bug inside JAX")

  monkeypatch.setattr(rules, "contract", broken)
  wrapped = lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0))
  with pytest.raises(NotImplementedError, match="a bug inside JAX"):
    lora_fn.lora(lambda p, x: x @ p["w"])(wrapped, jnp.ones((3, 5)))


def test_shape_mismatch_is_an_error_naming_the_path():
  wrapped = lora_fn.wrap({"layer": {"w": jnp.ones((5, 7))}}, rank=2, targets=("w",), key=K(0))
  import dataclasses

  bad = {"layer": {"w": dataclasses.replace(wrapped["layer"]["w"], a=jnp.ones((3, 5)))}}
  with pytest.raises(
    ValueError,
    match=r"LoRA leaf at 'arg 0/layer/w'.*expects a of shape "
    r"\(2, 5\).*got a \(3, 5\)",
  ):
    lora_fn.lora(lambda p, x: x @ p["layer"]["w"])(bad, jnp.ones((2, 5)))


class _no_materialize:
  def __enter__(self):
    import warnings

    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("error", lora_fn.MaterializeWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def test_sites_reading_the_same_input_share_one_first_matmul():
  params = {
    n: {"kernel": jax.random.normal(K(i), (11, 2, 3))}
    for i, n in enumerate(("query", "key", "value"))
  }

  def fn(p, x):
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in ("query", "key", "value"))
    return q * k + v

  wrapped = randomize(
    lora_fn.wrap(
      params, rank=2, targets=("query", "key", "value"), key=K(5), rank_pattern={"key": 3}
    ),
    K(6),
  )
  x = jax.random.normal(K(7), (2, 5, 11))
  jaxpr = jax.make_jaxpr(lora_fn.lora(fn))(wrapped, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  # 3 base matmuls, one x·[Aq; Ak; Av]ᵀ (rank 2 + 3 + 2 = 7 columns), 3 up-projections.
  assert len(dots) == 7
  assert sum(e.outvars[0].aval.shape[-1] == 7 for e in dots) == 1
  assert_trees_close(jax.jit(lora_fn.lora(fn))(wrapped, x), fn(explicit_merge(wrapped), x))
  # With dropout each site keeps its own mask, so nothing is shared.
  dropped = lora_fn.wrap(params, rank=2, targets=("query", "key", "value"), key=K(5), dropout=0.1)
  jaxpr = jax.make_jaxpr(lambda p, x: lora_fn.lora(fn)(p, x, dropout_key=K(8)))(dropped, x)
  assert sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns) == 9


def test_contracted_stack_axis_is_not_shared():
  # Two kernels read the same x and contract their stack axis: x·Aᵀ must not be shared.
  params = {n: {"w": jax.random.normal(K(i), (2, 3, 5))} for i, n in enumerate(("p", "q"))}
  layouts = {"w": ("stack", "in", "out")}

  def fn(p, x):
    return tuple(jnp.einsum("nld,ldo->no", x, p[n]["w"]) for n in ("p", "q"))

  wrapped = randomize(lora_fn.wrap(params, rank=2, targets=("w",), layouts=layouts, key=K(1)), K(2))
  x = jax.random.normal(K(3), (4, 2, 3))
  assert_trees_close(jax.jit(lora_fn.lora(fn))(wrapped, x), fn(explicit_merge(wrapped), x))


def test_custom_vjp_rule_on_a_kernel_is_kept():
  @jax.custom_vjp
  def clip_grad(w):
    return w

  clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -1e-3, 1e-3),))
  fn = lambda p, x: jnp.sum(x @ clip_grad(p["w"]))
  wrapped = randomize(lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0)), K(1))
  x = jax.random.normal(K(2), (3, 5))
  trainable, frozen = lora_fn.split(wrapped)
  with pytest.warns(lora_fn.MaterializeWarning, match="custom_vjp_call"):
    got = jax.grad(lambda t: lora_fn.lora(fn)(lora_fn.combine(t, frozen), x))(trainable)
  want = jax.grad(lambda t: fn(lora_fn.merge(lora_fn.combine(t, frozen)), x))(trainable)
  assert_trees_close(got, want)


def test_optimization_barrier_falls_back():
  fn = lambda p, x: x @ jax.lax.optimization_barrier(p["w"])
  wrapped = randomize(lora_fn.wrap({"w": jnp.ones((5, 7))}, rank=2, targets=("w",), key=K(0)), K(1))
  x = jax.random.normal(K(2), (3, 5))
  with pytest.warns(lora_fn.MaterializeWarning, match="optimization_barrier"):
    got = lora_fn.lora(fn)(wrapped, x)
  assert_trees_close(got, fn(lora_fn.merge(wrapped), x))
