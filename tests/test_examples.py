"""The quickstart example runs and learns."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_learns_the_hidden_low_rank_change():
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", proc.stdout)]
  assert proc.stdout.startswith("trainable params:")
  assert losses[-1] < 0.05 * losses[0], proc.stdout
