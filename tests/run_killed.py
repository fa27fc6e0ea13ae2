"""``train/run.py``, killed with SIGKILL when it is about to train the step after STEP.

    PYTHONPATH=train python tests/run_killed.py STEP --config configs/... [run.py flags]
    PYTHONPATH=train python tests/run_killed.py STEP run_llm --config ...   # train/run_llm.py

The kill -9 tests' stand-in for a crash at a step boundary: it wraps ``run.make_train_step``
so the step function kills the process instead of running step STEP + 1 (step STEP's eval
and checkpoint have been started by then, as in a real crash).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
  import importlib

  import run
  from absl import logging

  last = int(sys.argv.pop(1))
  job = importlib.import_module(sys.argv.pop(1) if sys.argv[1:2] == ["run_llm"] else "run")
  make_train_step = job.make_train_step

  def make_killing_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step_or_kill(state, frozen, batch, step, *rest):
      if step > last:
        os.kill(os.getpid(), signal.SIGKILL)
      return train_step(state, frozen, batch, step, *rest)

    return step_or_kill

  job.make_train_step = make_killing_train_step
  logging.set_verbosity(logging.WARNING)
  run.app.run(job.main, flags_parser=run.parse_flags)


if __name__ == "__main__":
  main()
