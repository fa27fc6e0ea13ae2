"""Input pipelines for ``train/run.py``: Hugging Face ``datasets`` + grain, and sklearn digits.

Every pipeline is a grain ``MapDataset`` of fixed-size batches indexed by step: batch ``i``
is the same whatever happened before, so a resumed run reads exactly the batches an
uninterrupted run would. Each example carries a ``valid`` flag: an image that cannot be
decoded becomes a masked-out blank instead of a crash, and is counted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from errors import HubUnreachable
from PIL import Image


@dataclasses.dataclass
class Split:
  """A labelled split: a random-access source of ``(image, label)`` and the class names."""

  source: Any  # anything with __len__ and __getitem__ -> {"image": ..., "label": int}
  class_names: list[str]

  def __len__(self) -> int:
    return len(self.source)


def to_pixels(image: Any, size: int) -> np.ndarray:
  """Decodes an image (PIL, bytes, {"bytes"/"path"} or array) to (size, size, 3) in [-1, 1]."""
  image = to_pil(image).convert("RGB")
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def random_resized_crop(
  image: Any, size: int, rng: np.random.Generator, scale: Sequence[float], flip: bool = True
) -> np.ndarray:
  """Inception-style crop (area ``scale``, aspect 3/4..4/3) resized to ``size``, random flip."""
  image = to_pil(image)
  w, h = image.size
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      image = image.crop((x0, y0, x0 + cw, y0 + ch))
      break
  pixels = to_pixels(image, size)
  return pixels[:, ::-1] if flip and rng.random() < 0.5 else pixels


def to_pil(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, dict):
    image = image.get("bytes") or image.get("path")
  if isinstance(image, (bytes, bytearray)):
    return Image.open(io.BytesIO(image))
  if isinstance(image, (str, os.PathLike)):
    return Image.open(image)
  return Image.fromarray(np.asarray(image))


class _Decode:
  """Per-example transform; failures give a blank image with ``valid = 0``."""

  def __init__(
    self, size: int, train: bool, crop_scale: Sequence[float], flip: bool, label_map: np.ndarray
  ):
    self.size, self.train, self.crop_scale, self.flip = size, train, crop_scale, flip
    self.label_map = label_map

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    try:
      if self.train:
        pixels = random_resized_crop(example["image"], self.size, rng, self.crop_scale, self.flip)
      else:
        pixels = to_pixels(example["image"], self.size)
      valid = 1
    except Exception:  # any unreadable image is skipped and counted
      pixels, valid = np.zeros((self.size, self.size, 3), np.float32), 0
    label = int(self.label_map[int(example["label"])])
    return {
      "image": np.ascontiguousarray(pixels),
      "label": np.int32(label),
      "valid": np.int32(valid),
      "index": np.int32(example["index"]),
    }


def _with_index(index: int, example: dict[str, Any]) -> dict[str, Any]:
  return {**example, "index": index}


def batches(
  split: Split,
  *,
  batch_size: int,
  seed: int,
  train: bool,
  image_size: int,
  epochs: int = 1,
  class_names: Sequence[str] | None = None,
  crop_scale: Sequence[float] = (0.35, 1.0),
  flip: bool = True,
) -> grain.MapDataset:
  """Fixed-size batches, indexed by step, of this host's shard of ``split``.

  Training shuffles with ``seed`` (a new order each epoch) and augments with a per-example
  key derived from ``seed`` and the position, so batch ``i`` is reproducible. Labels are
  mapped by class *name* onto ``class_names`` (default: the split's own names).
  """
  label_map = label_mapping(split.class_names, class_names or split.class_names)
  # Each example carries its position in the split, so per-process results can be put back
  # in dataset order.
  ds = grain.MapDataset.source(split.source).map_with_index(_with_index)
  if jax.process_count() > 1:
    ds = ds[jax.process_index() :: jax.process_count()]
  if train:
    ds = ds.shuffle(seed=seed).repeat(epochs)
  ds = ds.random_map(_Decode(image_size, train, crop_scale, flip, label_map), seed=seed + 1)
  return ds.batch(batch_size, drop_remainder=train)


def label_mapping(names: Sequence[str], reference: Sequence[str]) -> np.ndarray:
  """``map[i]`` is the index in ``reference`` of the class called ``names[i]``."""
  index = {n: i for i, n in enumerate(reference)}
  missing = [n for n in names if n not in index]
  if missing:
    raise ValueError(
      f"classes {missing[:5]} of the data are not among the model's "
      f"{len(reference)} classes (e.g. {list(reference)[:5]})"
    )
  return np.array([index[n] for n in names], np.int32)


def iterate(ds: grain.MapDataset, start: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches ``start, start + 1, ...``, decoded by ``workers`` processes when > 0."""
  it = ds[start:].to_iter_dataset(grain.ReadOptions(num_threads=max(workers, 1) * 2))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


def load_hf(name: str, path: str, split: str) -> Split:
  """A split of a Hugging Face dataset: from the hub, or a local imagefolder/parquet copy.

  Raises:
    HubUnreachable: at once, if the hub is needed and cannot be reached.
  """
  import datasets

  if path:
    files = [f for f in os.listdir(path) if f.endswith(".parquet")] if os.path.isdir(path) else []
    if files or path.endswith(".parquet"):
      ds = datasets.load_dataset(
        "parquet", data_dir=path if files else None, data_files=None if files else path, split=split
      )
    else:
      ds = datasets.load_dataset("imagefolder", data_dir=path, split=split)
  else:
    try:
      ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # any failure to reach the hub ends up here
      raise HubUnreachable(
        f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
        "If the hub is unreachable, point at a local copy with --config.data.path=DIR "
        "(an imagefolder with one sub-directory per class under train/ and validation/, "
        "or the dataset's parquet files)."
      ) from e
  ds = ds.cast_column("image", datasets.Image(decode=False))  # decode in the workers
  return Split(ds, list(ds.features["label"].names))


def digits(
  classes: Sequence[int], *, image_size: int, eval_fraction: float = 0.25, seed: int = 0
) -> tuple[Split, Split]:
  """scikit-learn's bundled handwritten digits (8x8, 1,797 images), real data offline.

  Returns train and eval splits of the chosen digit classes, labelled 0..len(classes)-1.
  """
  from sklearn.datasets import load_digits

  data = load_digits()
  keep = np.isin(data.target, classes)
  images = (data.images[keep] / 16.0 * 255).astype(np.uint8)
  labels = np.searchsorted(np.asarray(sorted(classes)), data.target[keep])
  order = np.random.default_rng(seed).permutation(len(labels))
  n_eval = int(len(order) * eval_fraction)
  names = [str(c) for c in sorted(classes)]
  make = lambda idx: Split(_ArraySource(images[idx], labels[idx], image_size), names)
  return make(order[n_eval:]), make(order[:n_eval])


class _ArraySource:
  """In-memory grayscale images as a random-access source of RGB uint8 examples."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
    up = np.kron(images, np.ones((size // images.shape[1],) * 2, np.uint8))
    self.images, self.labels = np.repeat(up[..., None], 3, axis=-1), labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}


def save_class_names(path: str, names: Sequence[str]) -> None:
  with open(path, "w") as f:
    json.dump(list(names), f)
