"""A pod whose process 1 gets stuck (alive, heartbeating, but never joining the next collective).

Run by tests/test_pods.py: `python tests/pod_stuck.py WORKDIR DATA_DIR COORDINATOR NPROC ID STUCK_TIMEOUT`.
launch.py's training (toy width), with a hook that makes process 1 sleep in Python after step 8 (its
watchdog thread keeps beating), so process 0 waits in the next collective until its watchdog ends it
(exit 124, watchdog.EXIT_STUCK, one line) and leaves its line for its peers; process 1's watchdog
reads it and ends with the same code, 124, and one line `error: process 0 ended the run: ...`
(watchdog.Watchdog: a peer that ended the run passes on its exit code).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()


def main(argv):
  workdir, data_dir, address, nproc, pid, timeout = argv[1:7]
  from fewshot_jax import multihost, train, watchdog  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  multihost.initialize(address, int(nproc), int(pid))
  config = load_config("protonet", "synthetic")
  config.data.data_dir = data_dir
  config.model.features = 16
  config.train.update(steps=40, eval_every=20, checkpoint_every=4, log_every=4, steps_per_call=2)
  config.eval.val_episodes = 16

  def hang(step, state):
    del state
    if step == 8 and int(pid) == 1:
      print("process 1: stuck after step 8", file=sys.stderr, flush=True)
      time.sleep(3600)

  with watchdog.watching(watchdog.Settings(stuck_timeout=float(timeout))) as watch:
    train.train_and_evaluate(config, workdir, hooks=[hang], watch=watch)


if __name__ == "__main__":
  main(sys.argv)
