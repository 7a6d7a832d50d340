"""fewshot_jax launcher: `python launch.py --config=configs/<method>.py:<preset> --workdir=DIR --mode=...`.

With no flags it runs the main job on the embedded default: ProtoNet on the
procedural `synthetic` dataset (no files needed), train then evaluate.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "protonet.py") + ":synthetic"

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file and preset, FILE:PRESET.",
                                lock_config=True)
flags.DEFINE_string("workdir", os.path.join("workdirs", "default"), "Checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train_eval", ["train", "eval", "train_eval"], "What to run.")
FLAGS = flags.FLAGS


class _QuietLibraries:
  """Drops INFO records of orbax and TFDS, which log every file they touch."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fewshot_jax import train  # pylint: disable=g-import-not-at-top
  from fewshot_jax.errors import FewshotError  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  try:
    if FLAGS.mode in ("train", "train_eval"):
      train.train_and_evaluate(config, FLAGS.workdir)
    if FLAGS.mode in ("eval", "train_eval"):
      result = evaluate.evaluate_checkpoint(config, FLAGS.workdir)
      print(json.dumps(result))
  except FewshotError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
