"""The Colab notebooks under colab/: executed end to end (tiny settings), outputs stripped in git.

Each notebook asserts its own claims (the restored adapter reproduces the trained model, the
merged model the factored one), so running it is the test. papermill injects the tiny
settings after the cell tagged ``parameters``, as a user would with ``papermill -p``.
"""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = sorted(f for f in os.listdir(COLAB) if f.endswith(".ipynb"))
# CI settings per notebook: a few steps, enough to exercise every cell.
TINY = {
  "quickstart.ipynb": {"steps": 40},
  # Offline (HF_HUB_OFFLINE=1): the notebook says so and runs the digits recipe.
  "vit_food101_tpu.ipynb": {
    "repo": ROOT,
    "offline_overrides": {
      "epochs": 1,
      "model.pretrain_epochs": 1,
      "compare_baselines": False,
      "data.eval_limit": 64,
    },
    "images_shown": 4,
  },
  # Offline too: the tiny offline recipe (a toy decoder pre-trained for a few steps).
  "qlora_llm.ipynb": {
    "repo": ROOT,
    "offline_config": "configs/llm_offline.py:tiny",
    "workdir": "runs/qlora_llm",
    "examples_shown": 2,
  },
}


# A line each notebook must print in CI.
EXPECTED = {
  "quickstart.ipynb": "restored model == trained model: True",
  "vit_food101_tpu.ipynb": "The Hugging Face hub cannot be reached from here: running the "
  "offline digits recipe",
  "qlora_llm.ipynb": "PEFT export generates as the trained model: True",
}


def test_every_notebook_has_ci_settings():
  assert sorted(TINY) == sorted(EXPECTED) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_outputs_are_stripped(name):
  with open(os.path.join(COLAB, name)) as f:
    nb = json.load(f)
  dirty = [
    i
    for i, cell in enumerate(nb["cells"])
    if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)
  ]
  assert not dirty, f"{name}: cells {dirty} keep outputs; strip them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_a_badge_and_a_parameters_cell(name):
  with open(os.path.join(COLAB, name)) as f:
    nb = json.load(f)
  first = "".join(nb["cells"][0]["source"])
  assert f"colab.research.google.com/github/lorax-fn/lorax_fn/blob/main/colab/{name}" in first
  tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  import papermill

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits it: no hub from CI
  papermill.execute_notebook(
    os.path.join(COLAB, name),
    os.path.join(tmp_path, name),
    parameters=TINY[name],
    cwd=str(tmp_path),
    kernel_name="python3",
    progress_bar=False,
  )
  with open(os.path.join(tmp_path, name)) as f:
    cells = json.load(f)["cells"]
  printed = "".join(
    "".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"]
  )
  assert EXPECTED[name] in printed
