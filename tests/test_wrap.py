"""``wrap``, ``merge``, ``unwrap``: targets, layouts, init, patterns and every error."""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_trees_equal, explicit_merge, randomize

import lorax_fn as lora_fn

K = jax.random.key


def _params():
  return {
    "enc": {
      "query": {"kernel": jnp.ones((5, 2, 3)), "bias": jnp.zeros((2, 3))},
      "value": {"kernel": jnp.ones((5, 2, 3)), "bias": jnp.zeros((2, 3))},
      "out": {"kernel": jnp.ones((2, 3, 5)), "bias": jnp.zeros(5)},
      "mlp": {"kernel": jnp.ones((5, 11)), "bias": jnp.zeros(11)},
      "norm": {"scale": jnp.ones(5)},
    },
    "conv": {"kernel": jnp.ones((3, 3, 5, 7))},
    "tok": {"embedding": jnp.ones((13, 5))},
    "step": jnp.zeros((), jnp.int32),
  }


def _lora_paths(p):
  return sorted(lora_fn._wrap.lora_paths(p))


@pytest.mark.parametrize(
  "targets, expected",
  [
    (("query", "value"), ["enc/query/kernel", "enc/value/kernel"]),
    (("enc",), ["enc/mlp/kernel", "enc/out/kernel", "enc/query/kernel", "enc/value/kernel"]),
    (r"enc/(query|out)/kernel", ["enc/out/kernel", "enc/query/kernel"]),
    (re.compile(r".*embedding"), ["tok/embedding"]),
    (lambda path, leaf: leaf.ndim == 4, ["conv/kernel"]),
    (("conv", "tok"), ["conv/kernel", "tok/embedding"]),
  ],
)
def test_target_forms(targets, expected):
  assert _lora_paths(lora_fn.wrap(_params(), rank=2, targets=targets, key=K(0))) == expected


def test_default_layouts_and_factor_shapes():
  p = lora_fn.wrap(_params(), rank=2, targets=("enc", "conv", "tok"), key=K(0))
  q, o, m = p["enc"]["query"]["kernel"], p["enc"]["out"]["kernel"], p["enc"]["mlp"]["kernel"]
  c, e = p["conv"]["kernel"], p["tok"]["embedding"]
  assert (q.roles, q.a.shape, q.b.shape) == (("in", "out", "out"), (2, 5), (2, 2, 3))
  assert (o.roles, o.a.shape, o.b.shape) == (("in", "in", "out"), (2, 2, 3), (2, 5))
  assert (m.roles, m.a.shape, m.b.shape) == (("in", "out"), (2, 5), (2, 11))
  assert (c.roles, c.a.shape, c.b.shape) == (("in", "in", "in", "out"), (2, 3, 3, 5), (2, 7))
  assert (e.roles, e.a.shape, e.b.shape) == (("in", "out"), (2, 13), (2, 5))
  # Biases, norm scales and integer leaves are untouched.
  assert p["enc"]["query"]["bias"] is not None and not lora_fn.is_lora(p["enc"]["norm"]["scale"])


def test_stacked_attention_default_layout():
  p = lora_fn.wrap(
    {"layers": {"query": {"kernel": jnp.ones((3, 5, 2, 7))}}}, rank=2, targets=("query",), key=K(0)
  )
  leaf = p["layers"]["query"]["kernel"]
  assert (leaf.roles, leaf.a.shape, leaf.b.shape) == (
    ("stack", "in", "out", "out"),
    (3, 2, 5),
    (3, 2, 2, 7),
  )


def test_init_matches_peft():
  big = {
    "a": {"kernel": jnp.ones((400, 300))},
    "b": {"kernel": jnp.ones((400, 300))},
    "tok": {"embedding": jnp.ones((50, 40))},
  }
  p = lora_fn.wrap(big, rank=8, targets=("a", "tok"), key=K(0))
  a = np.asarray(p["a"]["kernel"].a)
  bound = 1 / math.sqrt(400)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.02)  # uniform's std
  assert not p["a"]["kernel"].b.any()
  e = p["tok"]["embedding"]
  assert not e.a.any() and abs(float(e.b.std()) - 1.0) < 0.1
  g = lora_fn.wrap(big, rank=8, targets=("a",), key=K(0), init="gaussian")["a"]["kernel"]
  np.testing.assert_allclose(float(g.a.std()), 1 / 8, rtol=0.02)
  # Every leaf gets its own key.
  two = lora_fn.wrap(big, rank=8, targets=("a", "b"), key=K(0))
  assert not np.allclose(two["a"]["kernel"].a, two["b"]["kernel"].a)


def test_scaling_alpha_rslora_and_patterns():
  p = lora_fn.wrap(
    _params(),
    rank=4,
    targets=("query", "value", "mlp"),
    key=K(0),
    rank_pattern={"value": 2},
    alpha_pattern={"enc/mlp": 16.0},
  )
  q, v, m = (p["enc"][n]["kernel"] for n in ("query", "value", "mlp"))
  assert (q.rank, q.alpha, q.scale) == (4, 4.0, 1.0)
  assert (v.rank, v.alpha, v.a.shape) == (2, 2.0, (2, 5))  # alpha=None: alpha = its own rank
  assert (m.rank, m.alpha, m.scale) == (4, 16.0, 4.0)
  r = lora_fn.wrap(_params(), rank=4, alpha=8, targets=("mlp",), key=K(0), rslora=True)
  assert r["enc"]["mlp"]["kernel"].scale == 8 / 2


def test_dtype_defaults_and_override():
  base = {"k": {"kernel": jnp.ones((5, 7), jnp.bfloat16)}}
  p = lora_fn.wrap(base, rank=2, targets=("k",), key=K(0))
  assert p["k"]["kernel"].a.dtype == jnp.float32 and p["k"]["kernel"].w.dtype == jnp.bfloat16
  assert lora_fn.merge(p)["k"]["kernel"].dtype == jnp.bfloat16
  p = lora_fn.wrap(base, rank=2, targets=("k",), key=K(0), dtype=jnp.bfloat16)
  assert p["k"]["kernel"].b.dtype == jnp.bfloat16


def test_merge_and_unwrap():
  base = _params()
  p = randomize(lora_fn.wrap(base, rank=2, targets=("enc", "conv"), key=K(0)), K(1))
  assert_trees_equal(lora_fn.unwrap(p), base)
  merged = lora_fn.merge(p)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  np.testing.assert_allclose(
    merged["enc"]["out"]["kernel"], explicit_merge(p)["enc"]["out"]["kernel"], rtol=1e-6
  )
  assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, base)


def test_wrap_is_pure():
  base = _params()
  before = jax.tree.map(np.asarray, base)
  lora_fn.wrap(base, rank=2, targets=("enc",), key=K(0))
  assert_trees_equal(base, before)


def test_nnx_state():
  model = nnx.Sequential(nnx.Linear(5, 7, rngs=nnx.Rngs(0)), nnx.Linear(7, 3, rngs=nnx.Rngs(1)))
  graphdef, state = nnx.split(model)
  p = lora_fn.wrap(state, rank=2, targets=("layers",), key=K(0))
  assert _lora_paths(p) == ["layers/0/kernel", "layers/1/kernel"]
  p = randomize(p, K(1))
  x = jax.random.normal(K(2), (4, 5))
  run = lambda s, x: nnx.merge(graphdef, s)(x)
  np.testing.assert_allclose(
    jax.jit(lora_fn.lora(run))(p, x), run(lora_fn.merge(p), x), rtol=1e-5, atol=1e-6
  )


def test_linen_module_names_target_kernels_not_biases():
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, out_features=5)
  x = jnp.ones((1, 3, 5))
  params = model.init(K(0), x)
  p = lora_fn.wrap(params, rank=2, targets=("query", "out"), key=K(0))
  assert _lora_paths(p) == ["params/out/kernel", "params/query/kernel"]


# Every error, with its message (chex style: name, kwargs, exception, regex).
ERRORS = [
  (
    "no_match",
    dict(targets=("qeury",)),
    ValueError,
    r"targets \('qeury',\) matched no parameter; nearest available paths: "
    r"\['enc/query/kernel'",
  ),
  ("no_match_regex", dict(targets=r"decoder/.*"), ValueError, r"matched no parameter"),
  (
    "rank_zero",
    dict(targets=("mlp",), rank=0),
    ValueError,
    r"rank must be a positive int; got: 0",
  ),
  (
    "rank_too_big",
    dict(targets=("mlp",), rank=6),
    ValueError,
    r"rank for 'enc/mlp/kernel' must be at most min\(in, out\) = min\(5, 11\).*got: 6",
  ),
  (
    "rank_pattern_too_big",
    dict(targets=("query",), rank_pattern={"query": 7}),
    ValueError,
    r"rank for 'enc/query/kernel' must be at most min\(in, out\) = min\(5, 6\)",
  ),
  (
    "non_float",
    dict(targets=lambda path, leaf: path == "step"),
    TypeError,
    r"targeted leaf at 'step' must be a float array; got: int32",
  ),
  (
    "one_dim",
    dict(targets=r"enc/norm/scale"),
    ValueError,
    r"targeted leaf at 'enc/norm/scale' must have at least 2 axes",
  ),
  (
    "unknown_init",
    dict(targets=("mlp",), init="corda"),
    ValueError,
    r"init must be one of \('kaiming', 'gaussian', 'pissa', 'pissa_niter_<K>', 'olora', "
    r"'loftq'\); got: 'corda'",
  ),
  (
    "bad_dropout",
    dict(targets=("mlp",), dropout=1.0),
    ValueError,
    r"dropout must be in \[0, 1\); got: 1.0",
  ),
  (
    "bad_layout",
    dict(targets=("mlp",), layouts={"mlp": ("in", "in", "out")}),
    ValueError,
    r"layout for 'enc/mlp/kernel' must give one of \('in', 'out', 'stack'\) for each of "
    r"the 2 axes",
  ),
  (
    "no_out_axis",
    dict(targets=("mlp",), layouts={"mlp": ("in", "stack")}),
    ValueError,
    r"layout for 'enc/mlp/kernel' needs at least one 'in' and one 'out' axis",
  ),
  (
    "bad_targets_type",
    dict(targets=[1, 2]),
    TypeError,
    r"targets must be a sequence of names, a regex string or pattern, or a callable",
  ),
  ("empty_targets", dict(targets=()), ValueError, r"targets must not be empty"),
  # Every name a user gives must select something: never a silent no-op.
  (
    "typo_beside_a_good_name",
    dict(targets=("query", "vaule")),
    ValueError,
    r"targets name 'vaule' matched no parameter.*nearest available paths: "
    r"\['enc/value/kernel'",
  ),
  (
    "bad_regex_target",
    dict(targets=r"enc/(query"),
    ValueError,
    r"targets 'enc/\(query' is not a valid regular expression: missing \)",
  ),
  (
    "layout_key_matches_nothing",
    dict(targets=("mlp",), layouts={"mpl": ("in", "out")}),
    ValueError,
    r"layouts key 'mpl' matches no parameter of 2\+ axes; nearest: \['enc/mlp/kernel'",
  ),
  (
    "rank_pattern_key_matches_no_target",
    dict(targets=("mlp",), rank_pattern={"value": 3}),
    ValueError,
    r"rank_pattern key 'value' matches no targeted parameter; nearest: \['enc/mlp/kernel'\]",
  ),
  (
    "alpha_pattern_key_matches_nothing",
    dict(targets=("mlp", "query"), alpha_pattern={"qeury": 3.0}),
    ValueError,
    r"alpha_pattern key 'qeury' matches no targeted parameter; nearest: \['enc/query/kernel'",
  ),
  (
    "bad_regex_pattern_key",
    dict(targets=("mlp",), rank_pattern={"ml[p": 3}),
    ValueError,
    r"rank_pattern key 'ml\[p' is not a valid regular expression",
  ),
  (
    "pattern_not_a_mapping",
    dict(targets=("mlp",), layouts=[("mlp", ("in", "out"))]),
    TypeError,
    r"layouts must be a mapping from path patterns \(str\) to values",
  ),
  (
    "negative_alpha",
    dict(targets=("mlp",), alpha=-8.0),
    ValueError,
    r"alpha must be a positive finite number \(or None: alpha = rank\); got: -8.0",
  ),
  ("nan_alpha", dict(targets=("mlp",), alpha=float("nan")), ValueError, r"alpha must be.*nan"),
  ("inf_alpha", dict(targets=("mlp",), alpha=float("inf")), ValueError, r"alpha must be.*inf"),
  ("string_alpha", dict(targets=("mlp",), alpha="16"), ValueError, r"alpha must be.*'16'"),
  (
    "nan_alpha_pattern",
    dict(targets=("mlp",), alpha_pattern={"mlp": float("nan")}),
    ValueError,
    r"alpha_pattern\['mlp'\] must be a positive finite number",
  ),
  ("float_rank", dict(targets=("mlp",), rank=2.5), ValueError, r"rank must be a positive int"),
  ("bool_rank", dict(targets=("mlp",), rank=True), ValueError, r"rank must be a positive int"),
  (
    "int_factor_dtype",
    dict(targets=("mlp",), dtype=jnp.int8),
    TypeError,
    r"dtype of the factors must be a float dtype",
  ),
  ("rslora_not_bool", dict(targets=("mlp",), rslora="yes"), TypeError, r"rslora must be a bool"),
  ("dropout_string", dict(targets=("mlp",), dropout="0.1"), ValueError, r"dropout must be in"),
]


@pytest.mark.parametrize("name, kwargs, exc, regex", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, kwargs, exc, regex):
  kwargs = dict(rank=2, key=K(0)) | kwargs
  with pytest.raises(exc, match=regex):
    lora_fn.wrap(_params(), **kwargs)


def test_ambiguous_layout_is_an_error():
  with pytest.raises(
    ValueError,
    match=r"the layout of the 3-D kernel at 'stack/kernel' with "
    r"shape \(3, 5, 7\) is ambiguous.*infer_layouts",
  ):
    lora_fn.wrap({"stack": {"kernel": jnp.ones((3, 5, 7))}}, rank=2, targets=("stack",), key=K(0))


def test_wrapping_twice_is_an_error():
  p = lora_fn.wrap(_params(), rank=2, targets=("mlp",), key=K(0))
  with pytest.raises(ValueError, match=r"the leaf at 'enc/mlp/kernel' is already a LoRA leaf"):
    lora_fn.wrap(p, rank=2, targets=("mlp",), key=K(0))


def test_partial_regex_selects_kernels_only():
  p = lora_fn.wrap(_params(), rank=2, targets="query|value", key=K(0))
  assert _lora_paths(p) == ["enc/query/kernel", "enc/value/kernel"]


def test_rank_pattern_zero_is_an_error():
  with pytest.raises(ValueError, match=r"rank_pattern\['mlp'\] must be a positive int; got: 0"):
    lora_fn.wrap(_params(), rank=2, targets=("mlp",), rank_pattern={"mlp": 0}, key=K(0))


def test_pattern_keys_apply_in_order_and_only_where_they_match():
  p = lora_fn.wrap(
    _params(),
    rank=2,
    targets=("query", "value", "mlp"),
    rank_pattern={"enc/(query|value)": 3, "value": 1},  # the first matching key wins
    alpha_pattern={"mlp": 5.0},
    key=K(0),
  )
  enc = p["enc"]
  assert (enc["query"]["kernel"].rank, enc["value"]["kernel"].rank, enc["mlp"]["kernel"].rank) == (
    3,
    3,
    2,
  )
  assert (enc["query"]["kernel"].alpha, enc["mlp"]["kernel"].alpha) == (3.0, 5.0)


def test_merge_errors():
  p = lora_fn.wrap(_params(), rank=2, targets=("mlp",), key=K(0))
  with pytest.raises(
    TypeError,
    match=r"merge dtype \(None: each base.s\) must be a float dtype; got: <class .jax.numpy.int8.>",
  ):
    lora_fn.merge(p, dtype=jnp.int8)
  leaf = p["enc"]["mlp"]["kernel"]
  swapped = {"enc": {"mlp": {"kernel": dataclasses.replace(leaf, a=leaf.b, b=leaf.a)}}}
  with pytest.raises(
    ValueError,
    match=r"LoRA leaf at 'enc/mlp/kernel': base weight of shape \(5, 11\).*expects a of shape "
    r"\(2, 5\) and b of shape \(2, 11\); got a \(2, 11\) and b \(2, 5\)",
  ):
    lora_fn.merge(swapped)


def test_layout_keys_that_are_paths_match_exactly():
  base = {
    "Dense_0": {"kernel": jnp.ones((5, 7))},
    "Block": {"Dense_0": {"kernel": jnp.ones((3, 5, 7))}},
    "blk[1": {"kernel": jnp.ones((3, 5, 7))},  # a path that is not a valid regex
  }
  layouts = {
    "params/Block/Dense_0/kernel": ("stack", "in", "out"),
    "params/blk[1/kernel": ("stack", "in", "out"),
  }
  p = lora_fn.wrap(base, rank=2, targets=("Dense_0", "blk[1"), layouts=layouts, key=K(0))
  assert p["Block"]["Dense_0"]["kernel"].roles == ("stack", "in", "out")
  assert p["blk[1"]["kernel"].roles == ("stack", "in", "out")
  assert p["Dense_0"]["kernel"].roles == ("in", "out")  # the default, not the Block one
  # Only the params collection's prefix is dropped: a typo in a module name is an error.
  with pytest.raises(ValueError, match=r"layouts key 'Blok/Dense_0/kernel' matches no parameter"):
    lora_fn.wrap(
      base, rank=2, targets=("Dense_0",), layouts={"Blok/Dense_0/kernel": ("in", "out")}, key=K(0)
    )


def test_merge_computes_in_float32_then_casts():
  # A bf16 base and bf16 factors: W + s·BA is formed in float32 and rounded once.
  w = jax.random.normal(K(0), (13, 11), jnp.bfloat16)
  p = lora_fn.wrap({"k": w}, rank=3, alpha=5.0, targets=("k",), key=K(1), dtype=jnp.bfloat16)
  p = randomize(p, K(2))
  leaf = p["k"]
  exact = np.asarray(w, np.float64) + (5.0 / 3) * (
    np.asarray(leaf.a, np.float64).T @ np.asarray(leaf.b, np.float64)
  )
  merged = lora_fn.merge(p)["k"]
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(merged, np.float32), exact.astype(jnp.bfloat16).astype(np.float32)
  )
  np.testing.assert_allclose(lora_fn.merge(p, dtype=jnp.float32)["k"], exact, rtol=1e-6, atol=1e-6)
