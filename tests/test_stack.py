"""Many adapters over one base: per-example adapters, stacks, hot-swaps, pools, training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, randomize

import lorax_fn as lora_fn

K = jax.random.key
IDS = jnp.array([0, 2, -1, 1, 2])  # five examples, three adapters and the base alone


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x)


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(6, name="fc")(h)), None

    blocks = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(name="blocks")(x, None)[0]


def _linen(module, x):
  params = module.init(K(9), x[:1])["params"]
  return (lambda p, x: module.apply({"params": p}, x)), params


def _dense():
  """A plain function and its params: ``fn, params, x, targets, layouts``."""
  params = {"fc": {"kernel": jax.random.normal(K(0), (7, 11))}}
  return (
    (lambda p, x: x @ p["fc"]["kernel"]),
    params,
    jax.random.normal(K(1), (5, 7)),
    ("fc",),
    None,
  )


CASES = {
  "dense": _dense,
  "attention": lambda: (
    *_linen(_Attention(), jax.random.normal(K(1), (5, 4, 6))),
    jax.random.normal(K(1), (5, 4, 6)),
    ("query", "value", "out"),
    None,
  ),
  "conv": lambda: (
    *_linen(nn.Conv(5, (3, 3)), jax.random.normal(K(1), (5, 7, 7, 3))),
    jax.random.normal(K(1), (5, 7, 7, 3)),
    ("kernel",),
    None,
  ),
  "embed": lambda: (
    *_linen(nn.Embed(13, 6), jnp.zeros((5, 4), jnp.int32)),
    jax.random.randint(K(1), (5, 4), 0, 13),
    ("embedding",),
    None,
  ),
  "scanned": lambda: (
    *_linen(_Scanned(), jax.random.normal(K(1), (5, 6))),
    jax.random.normal(K(1), (5, 6)),
    ("fc",),
    {"blocks/fc/kernel": ("stack", "in", "out")},
  ),
  "nf4_base": lambda: (*_dense()[:3], ("fc",), "nf4"),
}


def _adapters(params, targets, layouts):
  quantized = layouts == "nf4"
  if quantized:
    params = lora_fn.quantize(params, "nf4", targets=targets, block_size=32)
    layouts = None
  specs = [(2, 2.0), (3, 7.0), (4, 1.5)]  # different ranks and alphas in one stack
  return [
    randomize(
      lora_fn.wrap(params, rank=r, alpha=a, targets=targets, layouts=layouts, key=K(10 + i)),
      K(20 + i),
    )
    for i, (r, a) in enumerate(specs)
  ], params


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_example_runs_with_its_own_adapter(name):
  fn, params, x, targets, layouts = CASES[name]()
  adapters, base = _adapters(params, targets, layouts)
  stacked = lora_fn.stack_adapters(adapters)
  apply = jax.jit(lora_fn.lora(fn))
  got = apply(stacked, x, adapter_ids=IDS)
  for row, slot in enumerate(IDS.tolist()):
    if slot >= 0:
      alone = apply(adapters[slot], x[row : row + 1])
    else:
      alone = fn(lora_fn.merge(base) if name == "nf4_base" else base, x[row : row + 1])
    assert_trees_close(got[row], alone[0], rtol=2e-5)


def test_padded_ranks_change_nothing_and_unstack_restores_each_adapter():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters, rank=6)
  assert stacked["fc"]["kernel"].a.shape == (3, 6, 7)
  for slot, adapter in enumerate(adapters):
    back = lora_fn.unstack_adapter(stacked, slot)["fc"]["kernel"]
    leaf = adapter["fc"]["kernel"]
    assert back.rank == leaf.rank
    np.testing.assert_allclose(back.merged(), leaf.merged(), rtol=1e-6, atol=1e-6)
    ids = jnp.full((5,), slot)
    assert_trees_close(lora_fn.lora(fn)(stacked, x, adapter_ids=ids), fn(lora_fn.merge(adapter), x))


def test_swaps_and_strengths_never_recompile():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters[:2], rank=4)
  step = jax.jit(lora_fn.lora(fn))
  step(stacked, x, adapter_ids=IDS.clip(-1, 1))
  for i in range(5):
    fresh = randomize(
      lora_fn.wrap(params, rank=1 + i % 4, alpha=float(i + 1), targets=targets, key=K(i)), K(i)
    )
    stacked = lora_fn.set_adapter(stacked, i % 2, fresh)
    got = step(stacked, x, adapter_ids=jnp.full((5,), i % 2, jnp.int32))
    assert_trees_close(got, fn(lora_fn.merge(fresh), x))
    stacked = lora_fn.set_strength(stacked, [0.5, 2.0])
    step(stacked, x, adapter_ids=IDS.clip(-1, 1))
  assert step._cache_size() == 1
  single = jax.jit(lora_fn.lora(fn))
  for s in (1.0, 0.5, 0.0):  # one adapter's strength: B scaled, data
    got = single(lora_fn.scale_adapter(adapters[0], s), x)
  assert single._cache_size() == 1
  assert_trees_close(got, fn(params, x))


def test_training_many_adapters_at_once_equals_training_each_alone():
  fn, params, _, targets, _ = _dense()
  x = jax.random.normal(K(3), (6, 7))
  y = jax.random.normal(K(4), (6, 11))
  ids = jnp.array([0, 1, 2, 0, 1, 2])
  adapters, _ = _adapters(params, targets, None)
  apply = lora_fn.lora(fn)

  def train(p, rows, adapter_ids=None, steps=3):
    tx = lora_fn.optimizer(optax.sgd(0.05), p)
    state = tx.init(p)
    for _ in range(steps):
      trainable, frozen = lora_fn.split(p)

      def loss(t, frozen=frozen):
        kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
        pred = apply(lora_fn.combine(t, frozen), x[rows], **kw)
        return jnp.sum((pred - y[rows]) ** 2)  # the sum of the examples' losses

      grads = jax.grad(loss)(trainable)
      updates, state = tx.update(grads, state, trainable)
      p = lora_fn.combine(optax.apply_updates(trainable, updates), frozen)
    return p

  together = train(lora_fn.stack_adapters(adapters), np.arange(6), ids)
  for slot, adapter in enumerate(adapters):
    alone = train(adapter, np.flatnonzero(np.asarray(ids) == slot))
    back = lora_fn.unstack_adapter(together, slot)["fc"]["kernel"]
    leaf = alone["fc"]["kernel"]
    assert_trees_close((back.a, back.b), (leaf.a, leaf.b), rtol=1e-5)


def test_adapter_pool_loads_by_name_evicts_the_least_recently_used(tmp_path):
  fn, params, x, targets, _ = _dense()
  make = lambda i: randomize(lora_fn.wrap(params, rank=2, targets=targets, key=K(i)), K(i + 50))
  for name in ("a", "b", "c"):
    lora_fn.save_adapter(tmp_path / name, make(ord(name)))
  pool = lora_fn.AdapterPool(make(0), slots=2, sources={n: tmp_path / n for n in "abc"}, rank=3)
  step = jax.jit(lora_fn.lora(fn))
  ids = pool.ids(["a", "b", None, "a", "b"])
  assert ids.tolist() == [0, 1, -1, 0, 1]
  step(pool.params, x, adapter_ids=ids)
  ids = pool.ids(["c", "a", "c", None, "a"])  # b was least recently used: c takes its slot
  assert pool.names == ["c", "a"] and ids.tolist() == [1, 0, 1, -1, 0]
  got = step(pool.params, x, adapter_ids=ids)
  want_c = fn(lora_fn.merge(make(ord("c"))), x)
  assert_trees_close(got[0], want_c[0])
  assert step._cache_size() == 1
  pool.evict("a")
  with pytest.raises(KeyError, match=r"adapter 'a' is not resident; resident: \['c'\]"):
    pool.evict("a")
  with pytest.raises(ValueError, match=r"need 3 distinct adapters, but the pool has 2 slots"):
    pool.ids(["a", "b", "c"])
  with pytest.raises(KeyError, match=r"no source for adapter 'zzz'"):
    pool.load("zzz")


def test_summary_and_split_of_a_stack():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  text = lora_fn.summary(stacked)
  assert text.splitlines()[2].split()[-3:] == ["3x4", "-", f"{3 * 4 * 7 + 3 * 4 * 11:,}"]
  trainable, frozen = lora_fn.split(stacked)
  leaf = trainable["fc"]["kernel"]
  assert leaf.w is None and leaf.scales is None and leaf.ranks is None and leaf.a is not None


def _stack_errors():
  fn, params, x, targets, _ = _dense()
  a1 = lora_fn.wrap(params, rank=2, targets=targets, key=K(0))
  other_base = lora_fn.wrap(
    {"fc": {"kernel": jnp.zeros((7, 11))}}, rank=2, targets=targets, key=K(0)
  )
  two = {"fc": {"kernel": params["fc"]["kernel"]}, "g": {"kernel": jnp.ones((7, 3))}}
  stacked = lora_fn.stack_adapters([a1, a1])
  apply = lora_fn.lora(fn)
  return [
    (
      "other_base",
      lambda: lora_fn.stack_adapters([a1, other_base]),
      ValueError,
      r"adapters\[1\] has another base weight at 'fc/kernel' than adapters\[0\]",
    ),
    (
      "other_targets",
      lambda: lora_fn.stack_adapters(
        [
          lora_fn.wrap(two, rank=2, targets=("fc",), key=K(0)),
          lora_fn.wrap(two, rank=2, targets=("fc", "g"), key=K(0)),
        ]
      ),
      ValueError,
      r"adapters\[1\] differs from adapters\[0\] at 'g/kernel': one has a LoRA leaf",
    ),
    (
      "other_layout",
      lambda: lora_fn.stack_adapters(
        [
          lora_fn.wrap(
            {"k": jnp.ones((2, 3, 4))},
            rank=1,
            targets=("k",),
            layouts={"k": ("in", "in", "out")},
            key=K(0),
          ),
          lora_fn.wrap(
            {"k": jnp.ones((2, 3, 4))},
            rank=1,
            targets=("k",),
            layouts={"k": ("in", "out", "out")},
            key=K(0),
          ),
        ]
      ),
      ValueError,
      r"adapters\[1\] has layout \('in', 'out', 'out'\) at 'k'",
    ),
    ("empty", lambda: lora_fn.stack_adapters([]), ValueError, r"non-empty sequence"),
    (
      "rank_below",
      lambda: lora_fn.stack_adapters([a1], rank=1),
      ValueError,
      r"rank must be at least the largest adapter's rank 2; got: 1",
    ),
    (
      "id_out_of_range",
      lambda: apply(stacked, x, adapter_ids=jnp.array([0, 1, 2, 0, 0])),
      ValueError,
      r"adapter_ids must be in \[-1, 2\) .*; got: \[2\]",
    ),
    (
      "ids_2d",
      lambda: apply(stacked, x, adapter_ids=jnp.zeros((5, 1), jnp.int32)),
      ValueError,
      r"adapter_ids must be a non-empty 1-D integer array",
    ),
    (
      "ids_float",
      lambda: apply(stacked, x, adapter_ids=jnp.zeros(5)),
      ValueError,
      r"and dtype float32",
    ),
    (
      "ids_wrong_count",
      lambda: apply(stacked, x, adapter_ids=jnp.zeros(4, jnp.int32)),
      ValueError,
      r"argument 1 has a leading \(example\) axis of size 5, but adapter_ids has 4",
    ),
    (
      "no_ids",
      lambda: apply(stacked, x),
      ValueError,
      r"params hold stacked adapters \(lorax_fn.stack_adapters\): pass adapter_ids=",
    ),
    (
      "ids_without_stack",
      lambda: apply(a1, x, adapter_ids=IDS),
      ValueError,
      r"adapter_ids was given, but no argument holds stacked adapters",
    ),
    (
      "output_without_example_axis",
      lambda: lora_fn.lora(lambda p, x: jnp.sum(fn(p, x)))(stacked, x, adapter_ids=IDS.clip(-1, 1)),
      ValueError,
      r"every output of fn must keep the example axis first; the output at the top has shape",
    ),
    (
      "swap_rank_too_big",
      lambda: lora_fn.set_adapter(
        stacked, 0, lora_fn.wrap(params, rank=3, targets=targets, key=K(0))
      ),
      ValueError,
      r"adapter has rank 3 at 'fc/kernel'; the stack's slots hold rank 2 at most",
    ),
    (
      "swap_slot",
      lambda: lora_fn.set_adapter(stacked, 2, a1),
      ValueError,
      r"slot must be in \[0, 2\)",
    ),
    (
      "strengths_length",
      lambda: lora_fn.set_strength(stacked, [1.0]),
      ValueError,
      r"strengths must hold 2 finite numbers, one per slot",
    ),
    (
      "merge_stack",
      lambda: lora_fn.merge(stacked),
      ValueError,
      r"merge: 'fc/kernel' holds a stack of 2 adapters; merge one of them",
    ),
    (
      "save_stack",
      lambda: lora_fn.adapter_config(stacked),
      ValueError,
      r"'fc/kernel' holds a stack of 2 adapters; save them one by one",
    ),
    (
      "swap_other_base",
      lambda: lora_fn.set_adapter(stacked, 0, other_base),
      ValueError,
      r"adapter has another base weight at 'fc/kernel' than the stack",
    ),
    (
      "swap_trained_head",
      lambda: lora_fn.set_adapter(
        lora_fn.stack_adapters([lora_fn.wrap(two, rank=2, targets=("fc",), key=K(0))]),
        0,
        lora_fn.wrap(
          {**two, "g": {"kernel": jnp.zeros((7, 3))}}, rank=2, targets=("fc",), key=K(1)
        ),
      ),
      ValueError,
      r"adapter differs from the stack at 'g/kernel', which is not a LoRA leaf: a slot holds",
    ),
    (
      "strength_of_an_empty_slot",
      lambda: lora_fn.set_strength(lora_fn.AdapterPool(a1, slots=2).params, [1.0, 0.0]),
      ValueError,
      r"slots \[0\] of the stack at 'fc/kernel' are empty; load an adapter into a slot",
    ),
    (
      "scale_a_stack",
      lambda: lora_fn.scale_adapter(stacked, 0.5),
      ValueError,
      r"params hold stacked adapters; set a slot's strength with lorax_fn.set_strength",
    ),
    (
      "check_a_split_half",
      lambda: lora_fn.split(stacked)[0]["fc"]["kernel"].check("fc/kernel"),
      ValueError,
      r"stacked LoRA leaf at 'fc/kernel' has no w, scales, ranks, strengths: it is one half",
    ),
    (
      "per_example_unknown",
      lambda: apply(stacked, x, adapter_ids=IDS.clip(-1, 1), per_example=(3,)),
      ValueError,
      r"per_example must name arguments of this call: positional indices in \[0, 2\)",
    ),
    (
      "per_example_params",
      lambda: apply(stacked, x, adapter_ids=IDS.clip(-1, 1), per_example=(0, 1)),
      ValueError,
      r"per_example names argument 0, which holds the parameters",
    ),
    (
      "per_example_without_ids",
      lambda: apply(a1, x, per_example=(1,)),
      ValueError,
      r"per_example is for adapter_ids: give both, or neither",
    ),
    (
      "fn_takes_adapter_ids",
      lambda: lora_fn.lora(lambda p, x, adapter_ids=None: x),
      TypeError,
      r"fn has a parameter named adapter_ids, which the transformed function takes",
    ),
  ]


STACK_ERRORS = 26


@pytest.mark.parametrize("case", range(STACK_ERRORS))
def test_stack_errors(case):
  cases = _stack_errors()
  assert len(cases) == STACK_ERRORS
  name, call, exc, regex = cases[case]
  with pytest.raises(exc, match=regex):
    call()


def test_out_of_range_ids_under_jit_are_the_base():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  got = jax.jit(lambda s, x, i: lora_fn.lora(fn)(s, x, adapter_ids=i))(
    stacked, x, jnp.array([7, -5, 0, 0, 0])
  )
  assert_trees_close(got[:2], fn(params, x[:2]))


def test_dropout_per_example_in_a_stack():
  fn, params, x, targets, _ = _dense()
  p = randomize(lora_fn.wrap(params, rank=2, targets=targets, dropout=0.5, key=K(0)), K(1))
  stacked = lora_fn.stack_adapters([p, p])
  ids = jnp.zeros(5, jnp.int32)
  a = lora_fn.lora(fn)(stacked, jnp.tile(x[:1], (5, 1)), adapter_ids=ids, dropout_key=K(3))
  assert not np.allclose(a[0], a[1])  # the same input, another mask per example
  b = lora_fn.lora(fn)(stacked, jnp.tile(x[:1], (5, 1)), adapter_ids=ids)
  assert_trees_close(b[0], b[1])


def test_strengths_are_set_not_multiplied_and_are_no_part_of_the_adapter():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  apply = jax.jit(lora_fn.lora(fn))
  ids = jnp.array([0, 1, 2, 0, 2])
  half = lora_fn.set_strength(lora_fn.set_strength(stacked, [0.5, 2.0, 0.0]), [0.5, 2.0, 0.0])
  got = apply(half, x, adapter_ids=ids)
  for row, (slot, strength) in enumerate(zip(ids.tolist(), [0.5, 2.0, 0.0, 0.5, 0.0], strict=True)):
    want = fn(lora_fn.merge(lora_fn.scale_adapter(adapters[slot], strength)), x[row : row + 1])
    assert_trees_close(got[row], want[0], rtol=2e-5)
  back = lora_fn.unstack_adapter(half, 1)["fc"]["kernel"]  # the adapter as trained
  np.testing.assert_allclose(back.merged(), adapters[1]["fc"]["kernel"].merged(), rtol=1e-6)
  swapped = lora_fn.set_adapter(half, 2, adapters[0])  # a new adapter runs at strength 1
  assert swapped["fc"]["kernel"].strengths.tolist() == [0.5, 2.0, 1.0]


def test_grad_over_a_whole_stacked_tree():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  ids = jnp.array([0, 1, -1, 1, 0])
  loss = lambda s: jnp.sum(lora_fn.lora(fn)(s, x, adapter_ids=ids) ** 2)
  grads = jax.grad(loss)(stacked)["fc"]["kernel"]
  assert grads.ranks.dtype == jnp.float32 and not np.any(grads.ranks)  # data, never trained
  assert np.any(grads.a[0]) and not np.any(grads.a[2, :, :])  # slot 2 serves no example


def test_per_example_names_the_arguments_that_are_per_example():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  table = jax.random.normal(K(5), (3, 11))  # every example reads the whole table
  f = lambda p, table, x: fn(p, x) + table.sum(0)
  apply = lora_fn.lora(f)
  with pytest.raises(ValueError, match=r"argument 1 has a leading \(example\) axis of size 3"):
    apply(stacked, table, x, adapter_ids=IDS)
  got = apply(stacked, table, x, adapter_ids=IDS, per_example=(2,))
  want = lora_fn.lora(fn)(stacked, x, adapter_ids=IDS) + table.sum(0)
  assert_trees_close(got, want, rtol=1e-5)
  kw = lora_fn.lora(lambda p, x, table: f(p, table, x))
  assert_trees_close(kw(stacked, x, table=table, adapter_ids=IDS, per_example=1), want, rtol=1e-5)


def test_ids_as_a_list_under_jit_and_layouts_of_a_stack():
  fn, params, x, targets, _ = _dense()
  adapters, _ = _adapters(params, targets, None)
  stacked = lora_fn.stack_adapters(adapters)
  run = jax.jit(lambda s, x, i, j: lora_fn.lora(fn)(s, x[:2], adapter_ids=[i, j]))
  got = run(stacked, x, jnp.int32(2), jnp.int32(-1))
  assert_trees_close(got[1], fn(params, x[1:2])[0])
  assert lora_fn.infer_layouts(fn, stacked, x) == lora_fn.infer_layouts(fn, params, x)


def test_pool_loads_checkpoints_of_other_ranks_and_a_failed_load_forgets_nothing(tmp_path):
  fn, params, x, targets, _ = _dense()
  template = lora_fn.wrap(params, rank=2, targets=targets, key=K(0))
  other = randomize(lora_fn.wrap(params, rank=3, alpha=6.0, targets=targets, key=K(1)), K(2))
  big = randomize(lora_fn.wrap(params, rank=5, targets=targets, key=K(3)), K(4))
  lora_fn.save_adapter(tmp_path / "r3", other)
  lora_fn.save_adapter(tmp_path / "r5", big)
  pool = lora_fn.AdapterPool(template, slots=1, rank=4)
  assert pool.load("r3", tmp_path / "r3") == 0
  got = lora_fn.lora(fn)(pool.params, x, adapter_ids=jnp.zeros(5, jnp.int32))
  assert_trees_close(got, fn(lora_fn.merge(other), x), rtol=2e-5)
  with pytest.raises(ValueError, match=r"adapter has rank 5 at 'fc/kernel'; the stack's slots"):
    pool.load("r5", tmp_path / "r5")
  assert pool.names == ["r3"]  # the failed load evicted nothing
  got = lora_fn.lora(fn)(pool.params, x, adapter_ids=jnp.zeros(5, jnp.int32))
  assert_trees_close(got, fn(lora_fn.merge(other), x), rtol=2e-5)
  pool.evict("r3")
  leaf = pool.params["fc"]["kernel"]
  assert leaf.ranks.tolist() == [0.0] and leaf.strengths.tolist() == [0.0]
