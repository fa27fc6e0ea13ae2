"""Interleaved timing for the benchmarks: this machine is noisy, so variants alternate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def interleaved(
  run: Callable[[str], None], names: Sequence[str], rounds: int
) -> dict[str, list[float]]:
  """Seconds of ``run(name)`` for each name, ``rounds`` times each.

  One warm-up call per name comes first (compiles; not timed). Each round rotates the order
  so no variant always follows the same neighbour. ``run`` must block until its work is done.
  """
  names = list(names)
  for name in names:
    run(name)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      t = time.perf_counter()
      run(name)
      times[name].append(time.perf_counter() - t)
  return times
