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


def test_many_adapters_serves_each_task_as_its_adapter_alone():
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "examples", "many_adapters.py"), "--steps", "150"],
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
  )
  rows = {
    line[:14].strip(): [float(v) for v in line[14:].split()]
    for line in proc.stdout.splitlines()[1:]
    if line.strip()
  }
  assert rows["mixed batch"] == rows["alone"], proc.stdout
  assert all(a > b + 0.3 for a, b in zip(rows["alone"], rows["base"], strict=True)), proc.stdout
  assert set(rows) == {"base", "alone", "mixed batch", "cat mix", "svd mix"}
