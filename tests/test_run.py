"""End to end: ``train/run.py`` on a small image folder written here, with kill -9 and resume."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cheesecake", "cheese_plate", "apple_pie")  # sorted: apple_pie, cheese_plate, cheesecake


def _write_folder(root):
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("validation", 3)):
    for c, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        img = np.full((12, 12, 3), 40 + 80 * c, np.uint8) + rng.integers(
          0, 30, (12, 12, 3), dtype=np.uint8
        )
        Image.fromarray(img).save(os.path.join(root, split, name, f"{i}.png"))
  with open(os.path.join(root, "train", CLASSES[0], "broken.png"), "wb") as f:
    f.write(b"this is not a png")


_ENV = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
# tests/run_killed.py imports run.py's module, as a notebook would.
_KILL_ENV = dict(_ENV, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "train"), ROOT]))


def _command(workdir, data, *extra):
  """A tiny random-base run on the image folder: 8 steps, checkpoints every 3."""
  return [
    sys.executable,
    os.path.join(ROOT, "train", "run.py"),
    "--config",
    os.path.join(ROOT, "configs", "vit_food101.py"),
    f"--config.workdir={workdir}",
    f"--config.data.path={data}",
    "--config.model.source=random",
    "--config.model.preset.patch_size=4",
    "--config.model.preset.hidden_size=16",
    "--config.model.preset.num_layers=2",
    "--config.model.preset.num_heads=2",
    "--config.model.preset.mlp_dim=24",
    "--config.data.image_size=12",
    "--config.data.workers=0",
    "--config.batch_size=4",
    "--config.epochs=2",
    "--config.checkpoint_every_steps=3",
    "--config.log_every_steps=1",
    "--config.lora.rank=2",
    "--config.optim.lr=0.01",
    *extra,
  ]


def _run(workdir, data, *extra, check=True):
  proc = subprocess.run(
    _command(workdir, data, *extra), capture_output=True, text=True, env=_ENV, timeout=600
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def _run_killed(workdir, data, last_step, *extra):
  """The same run, killed with SIGKILL before it trains step ``last_step + 1``."""
  cmd = _command(workdir, data, *extra)
  cmd[1:2] = [os.path.join(ROOT, "tests", "run_killed.py"), str(last_step)]
  return subprocess.run(cmd, capture_output=True, text=True, env=_KILL_ENV, timeout=600)


def _assert_user_error(proc, match):
  """Exit status 2 and one paragraph on stderr that matches; no traceback anywhere."""
  out = proc.stdout + proc.stderr
  assert proc.returncode == 2, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(match, last), proc.stderr[-3000:]
  assert proc.stderr.strip().split("\n\n")[-1] == last  # the message is one paragraph


def _final_state(workdir):
  """The last checkpoint's arrays by their tree paths ("opt_state/inner/1/0/mu/...")."""
  import orbax.checkpoint as ocp

  ckpt = os.path.join(workdir, "checkpoints")
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(last), "state"))
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.setdefault(prefix + k, v)

  walk(state, "")
  return last, flat


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  data = root / "food"
  _write_folder(data)
  full = _run(root / "full", data)
  killed = _run_killed(root / "killed", data, 5)
  resumed = _run(root / "killed", data)
  return root, data, full, killed, resumed


def test_trains_logs_and_counts_corrupt_images(runs):
  root, _, full, _, _ = runs
  work = root / "full"
  records = _records(work)
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [4, 8]
  assert all(0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 for r in evals)
  assert max(r["skipped_images"] for r in records if "skipped_images" in r) >= 1
  assert "trainable params:" in full.stdout and "skipped" in full.stdout
  assert os.listdir(work / "tb") and os.path.getsize(work / "curves.png") > 1000
  losses = [r["loss"] for r in records if r["split"] == "train" and "loss" in r]
  assert len(losses) == 8 and all(np.isfinite(losses))


def test_killed_run_resumes_bit_identical(runs):
  root, _, _, killed, resumed = runs
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert "resumed from the checkpoint at step 3" in resumed.stdout
  step_a, a = _final_state(root / "full")
  step_b, b = _final_state(root / "killed")
  assert step_a == step_b == 8
  assert sorted(a) == sorted(b)
  assert "opt_state/inner/1/0/mu/params/head/kernel" in a  # keyed by tree path
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(runs, tmp_path):
  """A file of the newest checkpoint cut short (a full disk): resume from the one before."""
  root, data, _, _, _ = runs
  work = tmp_path / "w"
  shutil.copytree(root / "full", work)
  files = glob.glob(str(work / "checkpoints" / "8" / "state" / "**" / "d" / "*"), recursive=True)
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  proc = _run(work, data)
  assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
  assert f"checkpoint step 8 in {work}/checkpoints is damaged (" in proc.stdout
  assert f"moved it to {work}/checkpoints_damaged/8" in proc.stdout
  assert "resumed from the checkpoint at step 6" in proc.stdout
  assert os.path.isdir(work / "checkpoints_damaged" / "8")
  (_, a), (step, b) = _final_state(root / "full"), _final_state(work)
  assert step == 8 and sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_digits_with_three_classes_trains_in_process(tmp_path):
  """A head of as many outputs as classes asked for (it took the pre-training head's five)."""
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import run as run_lib

  import lorax_fn as lora_fn

  config = run_lib.load_config_file(os.path.join(ROOT, "configs", "digits.py"))
  config.workdir = str(tmp_path / "w")
  config.data.classes = (5, 6, 7)
  config.model.preset.update(dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32))
  config.model.pretrain_epochs, config.epochs, config.compare_baselines = 1, 1, False
  result = run_lib.train_and_evaluate(config)
  assert result["step"] == 12 and not result["interrupted"]
  assert 0 < result["best_accuracy"] <= 1
  saved = lora_fn.read_adapter_config(result["best_adapter"])
  assert saved["metadata"]["class_names"] == ["5", "6", "7"]
  assert np.load(tmp_path / "w" / "best_eval_logits.npy").shape[1] == 3
  assert os.path.getsize(result["curves"]) > 1000


def test_best_adapter_is_small_and_reproduces_eval(runs):
  root, data, _, _, _ = runs
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import jax
  import jax.numpy as jnp
  import run as run_lib
  import vit

  import lorax_fn as lora_fn

  work = root / "full"
  config = run_lib.load_config_file(os.path.join(ROOT, "configs", "vit_food101.py"))
  config.data.path, config.data.image_size, config.data.workers = str(data), 12, 0
  saved = lora_fn.read_adapter_config(work / "best_adapter")
  assert saved["metadata"]["class_names"] == sorted(CLASSES)
  model = vit.ViT(
    num_classes=3, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24
  )
  base = model.init(jax.random.key(config.seed), jnp.zeros((1, 12, 12, 3)))
  layouts = lora_fn.infer_layouts(model.apply, base, jnp.zeros((1, 12, 12, 3)))
  params = lora_fn.wrap(
    base,
    rank=2,
    alpha=16.0,
    targets=("query", "value"),
    layouts=layouts,
    dropout=0.1,
    key=jax.random.key(config.seed + 1),
  )
  params = lora_fn.restore_adapter(work / "best_adapter", params, trainable=("head",))
  arrays, _ = lora_fn._checkpoint.adapter_state(params, trainable=("head",))
  raw = sum(np.asarray(x).nbytes for x in arrays.values())
  assert _dir_bytes(work / "best_adapter") <= 1.1 * raw + 64 * 1024
  _, eval_split = run_lib.load_splits(config)
  got, logits = run_lib.evaluate(
    lora_fn.lora(model.apply), params, eval_split, config, 4, sorted(CLASSES), return_logits=True
  )
  best = max(r["accuracy"] for r in _records(work) if r["split"] == "eval")
  assert got["accuracy"] == best
  np.testing.assert_array_equal(logits, np.load(work / "best_eval_logits.npy"))


def test_resume_with_other_rank_is_an_error(runs):
  root, data, _, _, _ = runs
  proc = _run(root / "full", data, "--config.lora.rank=3", check=False)
  _assert_user_error(proc, r"was saved with rank=2 but the model has rank=3")


def test_unknown_config_key_lists_valid_keys(tmp_path):
  proc = _run(tmp_path / "w", tmp_path, "--config.lora.rnak=3", check=False)
  _assert_user_error(
    proc,
    "unknown config key 'lora.rnak'; valid keys under lora: alpha, dropout, rank, rslora, "
    "targets, trainable",
  )


@pytest.mark.parametrize(
  ("extra", "match"),
  [
    (("--config.optim.lr=-0.003",), r"config\.optim\.lr must be a finite number > 0; got: -0\.003"),
    (("--config.keep_checkpoints=0",), r"config\.keep_checkpoints must be an integer >= 1"),
    (
      ("--config.batch_size=100000",),
      r"config\.batch_size 100000 is larger than the 19 training examples",
    ),
    (
      ("--config.lora.targets=('query', 'vaule')",),
      r"targets name 'vaule' matched no parameter .*nearest available paths",
    ),
  ],
  ids=["negative_lr", "no_checkpoint_kept", "batch_larger_than_data", "target_matches_nothing"],
)
def test_user_error_is_one_paragraph_and_exit_status_2(runs, tmp_path, extra, match):
  _, data, _, _, _ = runs
  _assert_user_error(_run(tmp_path / "w", data, *extra, check=False), match)


def test_digits_data_path_is_an_error_and_debug_shows_the_traceback(tmp_path):
  cmd = [
    sys.executable,
    os.path.join(ROOT, "train", "run.py"),
    "--config",
    os.path.join(ROOT, "configs", "digits.py"),
    f"--config.workdir={tmp_path / 'w'}",
    "--config.data.path=/nonexistent",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=300)
  _assert_user_error(proc, r"config\.data\.path must be '' for the digits data")
  env = dict(_ENV, LORAX_FN_DEBUG="1")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "errors.ConfigError: invalid config: config.data.path" in proc.stderr


def test_config_overrides_apply():
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import run as run_lib

  config = run_lib.load_config_file(os.path.join(ROOT, "configs", "vit_food101.py") + ":all_linear")
  assert config.lora.targets == ("query", "key", "value", "out", "mlp_in", "mlp_out")
  digits = run_lib.load_config_file(os.path.join(ROOT, "configs", "digits.py"))
  assert digits.model.source == "pretrain:digits" and digits.data.flip is False


def test_non_finite_loss_stops_the_run(tmp_path):
  data = tmp_path / "food"
  _write_folder(data)
  proc = _run(
    tmp_path / "w", data, "--config.optim.lr=1e30", "--config.optim.grad_clip=1e30", check=False
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "the loss is not finite" in proc.stderr and "stopping" in proc.stderr


def test_sigint_saves_and_resumes(tmp_path):
  import signal
  import time

  data = tmp_path / "food"
  _write_folder(data)
  work = tmp_path / "w"
  args = [*_command(work, data), "--config.epochs=40"]
  # Output goes to files, not pipes: a pipe nobody reads while we wait could fill and block.
  with open(tmp_path / "out.txt", "w") as out_f, open(tmp_path / "err.txt", "w") as err_f:
    proc = subprocess.Popen(args, stdout=out_f, stderr=err_f, text=True, env=_ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not (
      os.path.exists(work / "metrics.jsonl") and len(_records(work)) > 5
    ):
      time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
  assert proc.returncode == 130, err[-2000:]
  step = int((out + err).split("interrupted at step ")[1].split(":")[0])
  assert os.path.isdir(work / "checkpoints" / str(step))
  resumed = _run_killed(work, data, step + 1, "--config.epochs=40")
  assert f"resumed from the checkpoint at step {step}" in resumed.stdout


def test_sharded_run_matches_one_device(runs, tmp_path):
  """4 virtual devices, weights split 4 ways (FSDP): the same losses and eval as one device."""
  root, data, _, _, _ = runs
  env = dict(_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  extra = ("--config.mesh=data=1,fsdp=4", "--config.shard_min_size=1")
  proc = subprocess.run(
    _command(tmp_path / "w", data, *extra), capture_output=True, text=True, env=env, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, four = _records(root / "full"), _records(tmp_path / "w")
  loss = lambda rs: [r["loss"] for r in rs if r["split"] == "train" and "loss" in r]
  np.testing.assert_allclose(loss(four), loss(one), rtol=1e-4)
  acc = lambda rs: [r["accuracy"] for r in rs if r["split"] == "eval"]
  assert acc(four) == acc(one)


def test_two_process_run_trains_checkpoints_and_resumes(runs, tmp_path):
  """Two processes x 2 CPU devices (jax.distributed over gloo): train, save, resume."""
  import socket

  _, data, _, _, _ = runs
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  work = tmp_path / "w"

  def launch(pid, *extra):
    cmd = _command(
      work,
      data,
      "--config.mesh=data=2,fsdp=2",
      "--config.shard_min_size=1",
      f"--config.dist.coordinator=127.0.0.1:{port}",
      "--config.dist.num_processes=2",
      f"--config.dist.process_id={pid}",
      *extra,
    )
    # Files, not pipes: nothing can block on them.
    with open(tmp_path / f"p{pid}.txt", "a") as out:
      return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)

  for _ in range(2):  # the second round finds the final checkpoint and resumes from it
    procs = [launch(i) for i in range(2)]
    for p in procs:
      p.wait(timeout=600)
    logs = [(tmp_path / f"p{i}.txt").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert "resumed from the checkpoint at step 8" in logs[0]
  records = _records(work)
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [4, 8]  # process 0 alone writes the log
  assert os.path.isdir(work / "checkpoints" / "8") and os.path.isdir(work / "best_adapter")
  assert np.load(work / "best_eval_logits.npy").shape == (9, 3)  # both processes' examples
  assert "step 8: eval accuracy" in logs[0] and "eval accuracy" not in logs[1]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_bfloat16_compute_trains_and_exports_merged(runs, tmp_path):
  _, data, _, _, _ = runs
  work = tmp_path / "w"
  exports = ("--config.export_merged=True", "--config.export_peft=True", "--config.export_hf=True")
  proc = _run(work, data, "--config.model.compute_dtype=bfloat16", *exports)
  losses = [r["loss"] for r in _records(work) if r["split"] == "train" and "loss" in r]
  assert len(losses) == 8 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert os.path.isdir(work / "merged") and os.path.isdir(work / "best_adapter")
  # The random base has no Hugging Face checkpoint: it is written for the adapter to name.
  assert f"PEFT adapter on {work}/base_hf written to {work}/peft" in proc.stdout
  assert "what vLLM would refuse in it: it trains ['params/head/bias'" in proc.stdout
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  base = transformers.ViTForImageClassification.from_pretrained(str(work / "base_hf"))
  with_adapter = peft.PeftModel.from_pretrained(base, str(work / "peft")).eval()
  merged = transformers.ViTForImageClassification.from_pretrained(str(work / "merged_hf")).eval()
  pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 3, 12, 12)).astype("f4"))
  with torch.no_grad():
    np.testing.assert_allclose(
      with_adapter(pixel_values=pixels).logits,
      merged(pixel_values=pixels).logits,
      rtol=1e-5,
      atol=1e-6,
    )


def test_batch_that_does_not_split_over_the_mesh_is_an_error(tmp_path):
  env = dict(_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cmd = _command(tmp_path / "w", tmp_path / "none", "--config.mesh=data=4", "--config.batch_size=6")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  _assert_user_error(
    proc, r"batch_size 6 must divide evenly over the mesh's data x fsdp = 4 batch shards"
  )


def _tiny_hf_vit(path):
  """A saved tiny ``ViTModel`` (a pooler, no head: as google/vit-base-patch16-224-in21k)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.ViTConfig(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    image_size=12,
    patch_size=4,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
  )
  transformers.ViTModel(config).save_pretrained(str(path))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_exports_reproduce_the_best_eval_in_peft_and_transformers(tmp_path):
  """A local Hugging Face base: PEFT (adapter on the base) and transformers (merged) give
  the best eval's logits, fed the pixels our eval decoded."""
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import data as data_lib
  import run as run_lib

  _tiny_hf_vit(tmp_path / "base")
  _write_folder(tmp_path / "food")
  config = run_lib.load_config_file(os.path.join(ROOT, "configs", "vit_food101.py"))
  config.workdir, config.model.source = str(tmp_path / "w"), str(tmp_path / "base")
  config.data.path, config.data.image_size, config.data.workers = str(tmp_path / "food"), 12, 0
  config.batch_size, config.epochs, config.log_every_steps = 4, 2, 4
  config.lora.rank, config.lora.targets, config.optim.lr = 2, ("query", "value", "mlp_in"), 0.01
  config.export_peft = config.export_hf = True
  result = run_lib.train_and_evaluate(config)
  assert result["peft"] == str(tmp_path / "w" / "peft")
  assert result["merged_hf"] == str(tmp_path / "w" / "merged_hf")
  adapter = json.loads((tmp_path / "w" / "peft" / "adapter_config.json").read_text())
  assert adapter["base_model_name_or_path"] == str(tmp_path / "base")
  assert adapter["modules_to_save"] == ["classifier"] and adapter["lora_dropout"] == 0.1

  _, eval_split = run_lib.load_splits(config)
  pixels = np.stack([data_lib.to_pixels(x["image"], 12) for x in eval_split.source])
  nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  best = np.load(tmp_path / "w" / "best_eval_logits.npy")
  # The three lines of the README: the base with a head of the run's classes, the adapter.
  base = transformers.ViTForImageClassification.from_pretrained(
    str(tmp_path / "base"), num_labels=3
  )
  with_adapter = peft.PeftModel.from_pretrained(base, result["peft"]).eval()
  merged = transformers.ViTForImageClassification.from_pretrained(result["merged_hf"]).eval()
  assert merged.config.id2label == dict(enumerate(sorted(CLASSES)))
  with torch.no_grad():
    for model in (with_adapter, merged):
      np.testing.assert_allclose(
        model(pixel_values=nchw).logits.numpy(), best, rtol=1e-5, atol=1e-5
      )


def test_export_flags_are_checked_before_any_work():
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import run as run_lib
  import validation
  from errors import ConfigError

  config = run_lib.load_config_file(os.path.join(ROOT, "configs", "vit_food101.py"))
  config.export_peft, config.export_hf, config.workdir = None, True, "gs://bucket/run"
  with pytest.raises(ConfigError) as e:
    validation.validate_config(config)
  assert "config.export_peft must be True or False; got: None" in str(e.value)
  assert (
    "config.export_hf writes a local directory under config.workdir, so config.workdir must "
    "be a local path; got: 'gs://bucket/run'" in str(e.value)
  )


def test_export_peft_of_what_peft_cannot_hold_stops_before_training():
  sys.path.insert(0, os.path.join(ROOT, "train"))
  import jax
  import jax.numpy as jnp
  import run as run_lib
  import vit
  from errors import ConfigError

  import lorax_fn as lora_fn

  model = vit.ViT(
    num_classes=3, patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=24
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
  base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  params = lora_fn.wrap(base, rank=2, targets=("query",), key=jax.random.key(1))
  run_lib.check_peft_export(model, params, ("head",))
  with pytest.raises(
    ConfigError,
    match=r"config\.export_peft: the run trains \['params/pos_embed'\], which belong to no "
    r"module of ViTForImageClassification.* may name the modules \['final_ln', 'head', 'key'",
  ):
    run_lib.check_peft_export(model, params, ("head", "pos_embed"))
