"""``train/data.py``: local imagefolder and parquet copies, labels by name, batches by step."""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train")
)
import data as data_lib

HUB_ORDER = ["cheesecake", "cheese_plate", "apple_pie"]  # a ClassLabel order, not sorted


def _png(value):
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def test_parquet_copy_keeps_the_hub_class_order(tmp_path):
  datasets = pytest.importorskip("datasets")
  features = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=HUB_ORDER)}
  )
  rows = {
    "image": [{"bytes": _png(10 * i), "path": None} for i in range(6)],
    "label": [0, 1, 2, 0, 1, 2],
  }
  for split in ("train", "validation"):
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
      str(tmp_path / f"{split}-00000-of-00001.parquet")
    )
  split = data_lib.load_hf("unused", str(tmp_path), "train")
  assert split.class_names == HUB_ORDER and len(split) == 6
  batch = data_lib.batches(split, batch_size=6, seed=0, train=False, image_size=4)[0]
  np.testing.assert_array_equal(batch["label"], [0, 1, 2, 0, 1, 2])
  assert batch["image"].shape == (6, 4, 4, 3) and batch["valid"].all()


def test_imagefolder_labels_are_mapped_by_name(tmp_path):
  for name in HUB_ORDER:
    os.makedirs(tmp_path / "train" / name)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "train" / name / "0.png")
  split = data_lib.load_hf("unused", str(tmp_path), "train")
  assert split.class_names == sorted(HUB_ORDER)  # the folder order differs from the hub's
  batch = data_lib.batches(
    split, batch_size=3, seed=0, train=False, image_size=4, class_names=HUB_ORDER
  )[0]
  names = [split.class_names[int(i)] for i in split.source["label"]]
  np.testing.assert_array_equal(batch["label"], [HUB_ORDER.index(n) for n in names])
  with pytest.raises(ValueError, match=r"classes \['apple_pie'\] of the data are not among"):
    data_lib.batches(
      split,
      batch_size=3,
      seed=0,
      train=False,
      image_size=4,
      class_names=["cheesecake", "cheese_plate"],
    )


def test_training_batches_are_deterministic_and_reshuffled_each_epoch():
  train, _ = data_lib.digits([0, 1, 2], image_size=8)
  ds = data_lib.batches(train, batch_size=8, seed=3, train=True, image_size=8, epochs=2, flip=False)
  again = data_lib.batches(
    train, batch_size=8, seed=3, train=True, image_size=8, epochs=2, flip=False
  )
  for i in (0, 5, len(ds) - 1):
    np.testing.assert_array_equal(ds[i]["image"], again[i]["image"])
  per_epoch = len(train) // 8
  first = np.concatenate([ds[i]["label"] for i in range(per_epoch)])
  second = np.concatenate([ds[per_epoch + i]["label"] for i in range(per_epoch)])
  assert not np.array_equal(first, second)
  resumed = next(data_lib.iterate(ds, 5, 0))
  np.testing.assert_array_equal(resumed["image"], ds[5]["image"])


def test_hub_unreachable_fails_at_once_with_advice(monkeypatch):
  pytest.importorskip("datasets")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RuntimeError, match=r"--config.data.path=DIR"):
    data_lib.load_hf("ethz/food101-does-not-exist", "", "train")
