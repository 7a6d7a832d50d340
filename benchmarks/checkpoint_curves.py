"""Accuracy of every retained checkpoint of a run, under several evaluation protocols.

Training validates under one protocol (eval.protocol, which also selects the
best checkpoint); this scores each checkpoint the run kept (train.keep_checkpoints)
on a split under each protocol given, from the workdir's own config.json, and
prints one table row per checkpoint (JSON with --json).

  python benchmarks/checkpoint_curves.py --workdir=runs/lgm-mini --split=val \
      --protocols=standard,reference --episodes=100 --reference_tasks=1000
"""

import json
import os
import sys

from absl import app
from absl import flags
import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from fewshot_jax import restore  # pylint: disable=g-import-not-at-top,wrong-import-position
from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
flags.DEFINE_enum("split", "val", ["train", "val", "test"], "Split to score.")
flags.DEFINE_list("protocols", ["standard", "reference"], "Evaluation protocols (evaluate.py).")
flags.DEFINE_integer("episodes", 100, "Episodes of the standard protocol.")
flags.DEFINE_integer("reference_tasks", 1000, "One-query tasks of the reference protocol.")
flags.DEFINE_list("steps", [], "Only these steps (default: every retained checkpoint).")
flags.DEFINE_string("data_dir", None, "Override data.data_dir of the run's config.")
flags.DEFINE_string("json", None, "Also write the rows here.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  xla_setup.set_cpu_defaults()
  with open(os.path.join(FLAGS.workdir, "config.json")) as f:
    config = config_lib.fill_missing(ml_collections.ConfigDict(json.load(f)), config_lib.base_config())
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  mesh = sharding.make_mesh()
  config = config_lib.fit_to_devices(config, mesh.size)
  ckpt = checkpoint.Checkpoints(FLAGS.workdir, config.train.keep_checkpoints)
  steps = [int(s) for s in FLAGS.steps] or sorted(ckpt.latest.all_steps())
  ckpt.close()
  evaluators, rows = {}, []
  print(f"{'step':>6} " + " ".join(f"{p:>22}" for p in FLAGS.protocols), flush=True)
  for step in steps:
    method, state = restore.load_for_eval(config, FLAGS.workdir, mesh, "latest", step)
    row = {"step": step}
    for protocol in FLAGS.protocols:
      if protocol not in evaluators:
        num = FLAGS.reference_tasks if protocol == "reference" else FLAGS.episodes
        loaded = next(iter(evaluators.values())).dataset if evaluators else None  # the split, loaded once
        evaluators[protocol] = evaluate.Evaluator(method, config, mesh, FLAGS.split, num, dataset=loaded,
                                                  protocol=protocol)
      row[protocol] = evaluators[protocol].run(state.params, state.model_state)
    rows.append(row)
    print(f"{step:>6} " + " ".join(f"{row[p]['accuracy']:>14.2f} +- {row[p]['ci95']:5.2f}"
                                   for p in FLAGS.protocols), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
