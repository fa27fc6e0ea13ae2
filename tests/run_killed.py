"""``train/run.py``, killed with SIGKILL when it is about to train the step after STEP.

    PYTHONPATH=train python tests/run_killed.py STEP --config configs/... [run.py flags]

The kill -9 tests' stand-in for a crash at a step boundary: it wraps ``run.make_train_step``
so the step function kills the process instead of running step STEP + 1 (step STEP's eval
and checkpoint have been started by then, as in a real crash).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
  import run
  from absl import logging

  last = int(sys.argv.pop(1))
  make_train_step = run.make_train_step

  def make_killing_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step_or_kill(state, frozen, batch, step):
      if step > last:
        os.kill(os.getpid(), signal.SIGKILL)
      return train_step(state, frozen, batch, step)

    return step_or_kill

  run.make_train_step = make_killing_train_step
  logging.set_verbosity(logging.WARNING)
  run.app.run(run.main, flags_parser=run.parse_flags)


if __name__ == "__main__":
  main()
