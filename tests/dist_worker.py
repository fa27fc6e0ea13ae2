"""One process of the two-process test (or, with ``--single``, the one-process reference).

    python tests/dist_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR
    python tests/dist_worker.py --single WORKDIR

Each of the two processes has 2 CPU devices and joins the other through
``jax.distributed.initialize`` on 127.0.0.1 with gloo collectives: the runtime that TPU pods
and GPU clusters use. Together they train an NF4 QLoRA model for 3 steps on a
``data=2,fsdp=2`` mesh, save the adapter with Orbax from both processes, restore it into
freshly placed parameters and write (process 0) ``WORKDIR/result.npz``.
"""

from __future__ import annotations

import os
import sys

single = sys.argv[1] == "--single"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={1 if single else 2}"

import jax  # noqa: E402

if not single:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  pid, n, port = (int(a) for a in sys.argv[1:4])
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid)

import numpy as np  # noqa: E402
from sharded_train import flat, per_device_bytes, setup, train  # noqa: E402

import lorax_fn as lora_fn  # noqa: E402


def main() -> None:
  workdir = sys.argv[-1]
  model, x, y, params = setup("nf4")
  mesh = lora_fn.make_mesh("data=1" if single else "data=2,fsdp=2")
  losses, trainable, frozen, _ = train(model, x, y, params, mesh, 3)
  trained = lora_fn.combine(trainable, frozen)
  path = os.path.join(workdir, "adapter")
  lora_fn.save_adapter(path, trained, trainable=("head",), metadata={"steps": 3})
  fresh = lora_fn.shard(params, mesh, min_size=1)
  restored = lora_fn.restore_adapter(path, fresh, trainable=("head",))
  restored_trainable, _ = lora_fn.split(restored, trainable=("head",))
  # Resharding global arrays (split -> replicated) keeps their values.
  replicated = lora_fn.shard(restored_trainable, mesh, "replicate")
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated))
  assert all(
    np.array_equal(a, b)
    for a, b in zip(flat(replicated).values(), flat(restored_trainable).values(), strict=True)
  )
  out = {"losses": np.asarray(losses), "process_count": np.asarray(jax.process_count())}
  out |= {f"trained{k}": v for k, v in flat(trainable).items()}
  out |= {f"restored{k}": v for k, v in flat(restored_trainable).items()}
  # Each device holds 1/2 of the quantised base's codes (fsdp=2).
  codes = [
    leaf.w.codes
    for leaf in jax.tree.leaves(frozen, is_leaf=lora_fn.is_lora)
    if lora_fn.is_lora(leaf)
  ]
  out["codes_total"] = np.asarray(sum(c.nbytes for c in codes))
  out["codes_per_device"] = np.asarray(list(per_device_bytes(codes).values()))
  if jax.process_index() == 0:
    np.savez(os.path.join(workdir, "result.npz"), **out)


if __name__ == "__main__":
  main()
