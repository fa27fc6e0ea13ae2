"""``serving_problems``: what vLLM would refuse in an adapter, before it is written."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from lorax_fn import _paths, _torch_layout
from lorax_fn._leaves import is_lora
from lorax_fn._peft_sites import _flat, _trained_leaves

# vLLM's choices for --max-lora-rank.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def serving_problems(
  params: Any,
  *,
  trainable: _paths.Targets | None = None,
  bias: str = "none",
  max_lora_rank: int = 16,
  heads: Sequence[str] = ("lm_head",),
) -> list[str]:
  """What vLLM would refuse in this adapter, one line each; empty if it serves it as is.

  vLLM serves plain LoRA on linear (and embedding) layers: no DoRA, no trained biases
  (unless the server enables them), no fully trained module but an output head, every rank
  at most the server's ``--max-lora-rank``, and one scale ``lora_alpha / r`` for every module
  (it reads no ``rank_pattern`` / ``alpha_pattern``).

  Args:
    params: the wrapped parameters.
    trainable: fully trained extra leaves, as for :func:`save_peft`.
    bias: the bias mode, as for :func:`save_peft`.
    max_lora_rank: the server's ``--max-lora-rank``, one of vLLM's choices.
    heads: module names (the last path component) that count as an output head.

  Returns:
    The problems, each naming the parameters concerned.

  Example:
    >>> import jax, jax.numpy as jnp, lorax_fn as lora_fn
    >>> p = lora_fn.wrap({"fc": {"kernel": jnp.ones((64, 64))}}, rank=32, targets=("fc",),
    ...                  key=jax.random.key(0))
    >>> lora_fn.serving_problems(p)
    ["rank 32 of ['fc/kernel'] is above the server's max_lora_rank 16"]
  """
  if max_lora_rank not in VLLM_RANKS:
    raise ValueError(f"max_lora_rank must be one of vLLM's {VLLM_RANKS}; got: {max_lora_rank!r}")
  _flat(params)  # refuses stacks
  loras, biases, whole = {}, [], []
  for path, leaf, trained, chosen in _trained_leaves(params, trainable, bias):
    if is_lora(leaf):
      loras[path] = leaf
    elif chosen:
      whole.append(path)
    elif trained:
      biases.append(path)
  problems = []
  if biases:
    problems.append(
      f"it trains biases {biases[:4]}: vLLM needs bias='none' (or a server started with "
      "--enable-lora-bias)"
    )
  module_name = lambda p: p.rpartition("/")[0].rpartition("/")[2]
  others = [p for p in whole if module_name(p) not in heads]
  if others:
    problems.append(
      f"it trains {others[:4]} fully: vLLM takes no modules_to_save but an output head "
      f"{tuple(heads)}"
    )
  too_big = collections.defaultdict(list)
  scales = collections.defaultdict(list)
  convs = []
  for path, leaf in loras.items():
    if leaf.rank > max_lora_rank:
      too_big[leaf.rank].append(path)
    scales[leaf.scale].append(path)
    inner = [r for r in leaf.roles if r != "stack"]
    if _torch_layout.kind(path.rsplit("/", 1)[-1], inner) == _torch_layout.CONV2D:
      convs.append(path)
  for rank, paths in sorted(too_big.items()):
    problems.append(
      f"rank {rank} of {paths[:4]} is above the server's max_lora_rank {max_lora_rank}"
    )
  if len(scales) > 1:
    parts = [f"{s:g} for {p[:2]}" for s, p in sorted(scales.items())]
    problems.append(
      f"its modules have different scales alpha/r ({'; '.join(parts)}): vLLM scales every "
      "module by one lora_alpha / r"
    )
  if convs:
    problems.append(f"{convs[:4]} are convolutions: vLLM serves LoRA on linear layers")
  adaloras = [p for p, leaf in loras.items() if leaf.e is not None]
  if adaloras:
    problems.append(
      f"{adaloras[:4]} are AdaLoRA (peft_type ADALORA): vLLM serves LoRA; serve the merged "
      "weights (lorax_fn.merge) instead"
    )
  doras = [p for p, leaf in loras.items() if leaf.dora]
  if doras:
    problems.append(
      f"{doras[:4]} are DoRA (use_dora): vLLM serves plain LoRA only; serve the merged "
      "weights (lorax_fn.merge) instead"
    )
  return problems
