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
      r"trainable \('haed',\) matched no parameter; "
      r"nearest available paths: \['head/",
    ),
  ],
)
def test_split_errors(kwargs, exc, regex):
  with pytest.raises(exc, match=regex):
    lora_fn.split(_wrapped(), **kwargs)


def test_typo_is_reported_even_with_bias_all():
  with pytest.raises(ValueError, match=r"trainable \('haed',\) matched no parameter"):
    lora_fn.split(_wrapped(), trainable=("haed",), bias="all")


def test_predicate_may_return_any_truthy_value():
  import re

  trainable, _ = lora_fn.split(_wrapped(), trainable=lambda p, x: re.search("head/kernel", p))
  assert trainable["head"]["kernel"] is not None and trainable["head"]["bias"] is None


def test_unwrapped_tree_is_an_error():
  with pytest.raises(ValueError, match=r"params hold no LoRA leaf and no trainable leaf"):
    lora_fn.split({"k": jnp.ones((3, 3))})
