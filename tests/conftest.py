import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Scripts the tests run in subprocesses (they set XLA_FLAGS / join jax.distributed on import).
collect_ignore = ["dist_worker.py", "sharded_train.py"]
