"""What survives a kill: SIGKILL at random moments, Ctrl-C, SIGTERM and a concurrent start.

Trains the synthetic ProtoNet preset through launch.py (short, with frequent
checkpoints, so kills land in every phase: start-up, steps, checkpoint writes,
validation) and compares each interrupted-then-resumed run's final state with
an uninterrupted run's, bit for bit. Prints one table row per scenario.

  python benchmarks/crash_safety.py --kills=10 --seed=0
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_integer("kills", 10, "SIGKILLs, each at a random moment of one run until it completes.")
flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary one).")
FLAGS = flags.FLAGS

_RUN = ["--config.train.steps=400", "--config.train.eval_every=100", "--config.train.checkpoint_every=5",
        "--config.train.log_every=5", "--config.train.steps_per_call=5", "--config.eval.val_episodes=16",
        "--config.episode.train_ways=5", "--mode=train"]


def _start(workdir, data_dir):
  env = dict(os.environ, TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, os.path.join(REPO, "launch.py"), f"--workdir={workdir}", *_RUN],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_state(workdir):
  """Every array of the latest checkpoint (step, params, model and optimiser state), from orbax's files."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(steps[-1]), "state"))
  import jax  # pylint: disable=g-import-not-at-top
  return steps[-1], [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
  return a[0] == b[0] and len(a[1]) == len(b[1]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def _until_done(workdir, data_dir, rng, kills: int) -> tuple[int, int]:
  """Runs, SIGKILLing `kills` times at random moments, then lets it finish; (kills done, restarts)."""
  done = restarts = 0
  while True:
    proc = _start(workdir, data_dir)
    restarts += 1
    if done < kills:
      try:
        proc.wait(timeout=rng.uniform(2.0, 14.0))  # start-up (JAX, data, restore) takes ~8 s here
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        done += 1
        continue
    else:
      proc.wait(timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"run failed with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return done, restarts


def _signal_once(workdir, data_dir, signum) -> str:
  """Sends `signum` after the first checkpoint, then resumes to the end; returns the stop line."""
  proc = _start(workdir, data_dir)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if "step 10/400" in line:
      proc.send_signal(signum)
  proc.wait(timeout=600)
  stop = next((l.strip() for l in lines if l.startswith("stopped by")), f"exit {proc.returncode}, no stop line")
  resumed = _start(workdir, data_dir)
  resumed.wait(timeout=600)
  return f"exit {proc.returncode}: {stop}"


def main(argv):
  del argv
  rng = random.Random(FLAGS.seed)
  root = tempfile.mkdtemp(prefix="crash_safety_")
  data_dir = FLAGS.data_dir or os.path.join(root, "tfds")
  rows = []
  try:
    reference = os.path.join(root, "reference")
    t = time.time()
    _until_done(reference, data_dir, rng, 0)
    want = _final_state(reference)
    rows.append(("uninterrupted run (reference)", f"step {want[0]} in {time.time() - t:.0f} s", "-"))

    killed = os.path.join(root, "killed")
    kills, restarts = _until_done(killed, data_dir, rng, FLAGS.kills)
    got = _final_state(killed)
    rows.append((f"SIGKILL at {kills} random moments (uniform 2-14 s after each start)",
                 f"finished after {restarts} starts", "yes" if _same(want, got) else "NO"))

    for signum, name in ((signal.SIGINT, "Ctrl-C (SIGINT)"), (signal.SIGTERM, "SIGTERM")):
      workdir = os.path.join(root, name.split()[0])
      outcome = _signal_once(workdir, data_dir, signum)
      rows.append((f"{name} after step 10, then the same command", outcome,
                   "yes" if _same(want, _final_state(workdir)) else "NO"))

    both = os.path.join(root, "both")
    procs = [_start(both, data_dir), _start(both, data_dir)]
    codes = [p.wait(timeout=600) for p in procs]
    errors = [l for p in procs for l in p.stderr.read().splitlines() if l.startswith("error:")]
    rows.append(("two runs started on one workdir at once",
                 f"exit codes {sorted(codes)}; {errors[0] if errors else 'no error line'}",
                 "yes" if sorted(codes) == [0, 2] and _same(want, _final_state(both)) else "NO"))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print("| scenario | outcome | final state bit-identical to the uninterrupted run |")
  print("|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
