"""``split`` / ``combine`` / ``trainable_mask``."""

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_trees_equal

import lorax_fn as lora_fn


def _wrapped():
  params = {
    "body": {
      "dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)},
      "other": {"kernel": jnp.ones((7, 7)), "bias": jnp.zeros(7)},
    },
    "head": {"kernel": jnp.ones((7, 3)), "bias": jnp.zeros(3)},
    "ids": [jnp.arange(3), (jnp.ones(2),)],
  }
  return lora_fn.wrap(params, rank=2, targets=("dense",), key=jax.random.key(0))


def _trained_paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted(jax.tree_util.keystr(p) for p, _ in flat)


@pytest.mark.parametrize(
  "kwargs, expected",
  [
    ({}, ["['body']['dense']['kernel'].a", "['body']['dense']['kernel'].b"]),
    (
      {"trainable": ("head",)},
      [
        "['body']['dense']['kernel'].a",
        "['body']['dense']['kernel'].b",
        "['head']['bias']",
        "['head']['kernel']",
      ],
    ),
    (
      {"bias": "lora_only"},
      [
        "['body']['dense']['bias']",
        "['body']['dense']['kernel'].a",
        "['body']['dense']['kernel'].b",
      ],
    ),
    (
      {"bias": "all"},
      [
        "['body']['dense']['bias']",
        "['body']['dense']['kernel'].a",
        "['body']['dense']['kernel'].b",
        "['body']['other']['bias']",
        "['head']['bias']",
      ],
    ),
    (
      {"trainable": r"head/kernel"},
      ["['body']['dense']['kernel'].a", "['body']['dense']['kernel'].b", "['head']['kernel']"],
    ),
  ],
)
def test_split_selects(kwargs, expected):
  p = _wrapped()
  trainable, frozen = lora_fn.split(p, **kwargs)
  assert _trained_paths(trainable) == expected
  assert len(jax.tree.leaves(trainable)) + len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(p))
  assert_trees_equal(lora_fn.combine(trainable, frozen), p)
  assert jax.tree.structure(lora_fn.combine(trainable, frozen)) == jax.tree.structure(p)


def test_split_is_jittable_and_grad_skips_frozen():
  p = _wrapped()

  @jax.jit
  def grads(p, x):
    t, f = lora_fn.split(p)
    run = lora_fn.lora(lambda p, x: x @ p["body"]["dense"]["kernel"])
    return jax.grad(lambda t: run(lora_fn.combine(t, f), x).sum())(t)

  g = grads(p, jnp.ones((2, 5)))
  assert _trained_paths(g) == ["['body']['dense']['kernel'].a", "['body']['dense']['kernel'].b"]


@pytest.mark.parametrize(
  "kwargs, exc, regex",
  [
    (
      {"bias": "some"},
      ValueError,
      r"bias must be one of \('none', 'all', 'lora_only'\); "
      r"got: 'some'",
    ),
    (
      {"trainable": ("haed",)},
      ValueError,
      r"trainable 'haed' matched no parameter; "
      r"nearest available paths: \['head/",
    ),
  ],
)
def test_split_errors(kwargs, exc, regex):
  with pytest.raises(exc, match=regex):
    lora_fn.split(_wrapped(), **kwargs)


def test_typo_is_reported_even_with_bias_all():
  with pytest.raises(ValueError, match=r"trainable 'haed' matched no parameter"):
    lora_fn.split(_wrapped(), trainable=("haed",), bias="all")


def test_predicate_may_return_any_truthy_value():
  import re

  trainable, _ = lora_fn.split(_wrapped(), trainable=lambda p, x: re.search("head/kernel", p))
  assert trainable["head"]["kernel"] is not None and trainable["head"]["bias"] is None


def test_unwrapped_tree_is_an_error():
  with pytest.raises(ValueError, match=r"params hold no LoRA leaf and no trainable leaf"):
    lora_fn.split({"k": jnp.ones((3, 3))})


def _halves(**kw):
  kw = dict(rank=2, targets=("dense",)) | kw
  base = lora_fn.unwrap(_wrapped())
  return lora_fn.split(lora_fn.wrap(base, key=jax.random.key(0), **kw))


COMBINE_ERRORS = [
  (
    "none_half",
    lambda: (_halves()[0], None),
    TypeError,
    r"combine got None as tree 1; pass both halves that lorax_fn.split returned",
  ),
  (
    "other_rank",
    lambda: (_halves(rank=3)[0], _halves()[1]),
    ValueError,
    r"combine: the LoRA leaf at 'body/dense/kernel' has rank=3 in one tree and rank=2 in "
    r"another; combine the halves of one wrap",
  ),
  (
    "other_alpha",
    lambda: (_halves(alpha=4.0)[0], _halves()[1]),
    ValueError,
    r"has alpha=4.0 in one tree and alpha=2.0 in another",
  ),
  (
    "other_targets",
    lambda: (_halves(targets=("dense", "other"))[0], _halves()[1]),
    ValueError,
    r"combine: at 'body/other/kernel' one tree holds a LoRA leaf and another a plain array",
  ),
  (
    "other_structure",
    lambda: (_halves()[0], {"body": None}),
    ValueError,
    r"combine: tree 1 does not have the structure of tree 0",
  ),
  ("nothing", lambda: (), TypeError, r"combine needs the trees to merge"),
]


@pytest.mark.parametrize(
  "name, trees, exc, regex", COMBINE_ERRORS, ids=[e[0] for e in COMBINE_ERRORS]
)
def test_combine_errors(name, trees, exc, regex):
  with pytest.raises(exc, match=regex):
    lora_fn.combine(*trees())


def test_a_half_passed_where_the_whole_is_needed_is_named():
  trainable, frozen = _halves()
  apply = lora_fn.lora(lambda p, x: x @ p["body"]["dense"]["kernel"])
  with pytest.raises(
    ValueError,
    match=r"LoRA leaf at 'arg 0/body/dense/kernel' has no w \(None\): it is one half of "
    r"lorax_fn.split; combine it with the frozen half first",
  ):
    apply(trainable, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"has no a or b \(None\).*with the trainable half"):
    lora_fn.merge(frozen)
