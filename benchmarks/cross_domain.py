"""Cross-domain evaluation: short CPU-trained ProtoNets scored in-domain and on another dataset.

Trains each case through launch.py (its preset with fewer steps), then scores the best-by-validation
checkpoint on its own test split and on the other dataset's (`--config.eval.data=NAME:test`: the other
images converted to the training channels, resized to the model's input, normalised with the training
statistics), each at 1 and 5 shots, and prints one table row per (case, task, evaluated data).

  FEWSHOT_DATA_DIR=../shared/data python benchmarks/cross_domain.py --out=runs/cross_domain

miniImageNet -> Omniglot: an RGB 84 px model on grey 28 px characters; Omniglot -> synthetic: the grey
28 px model on the generated dataset. miniImageNet -> CUB (Chen et al. 2019) is the same command with
`cub:test` where a CUB copy is held (docs/running.md).
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("out", None, "Folder for the cases' workdirs and cross_domain.json.", required=True)
flags.DEFINE_list("cases", ["omniglot", "mini"], "Which cases to run (CASES).")
flags.DEFINE_integer("episodes", 600, "Test episodes per evaluation.")
FLAGS = flags.FLAGS

# name: (preset, training overrides, the other dataset). miniImageNet trains 5-way (not the preset's
# 20-way: 3.6x the step time on this CPU).
CASES = {
    "mini": ("mini-5w5s", ["--config.train.steps=1200", "--config.train.eval_every=400",
                           "--config.episode.train_ways=5", "--config.eval.val_episodes=200"], "omniglot"),
    "omniglot": ("omniglot-5w1s", ["--config.train.steps=1500", "--config.train.eval_every=500"], "synthetic"),
}


def _launch(preset, workdir, mode, *overrides):
  subprocess.run([sys.executable, os.path.join(REPO, "launch.py"),
                  f"--config={os.path.join(REPO, 'configs', 'protonet.py')}:{preset}",
                  f"--workdir={workdir}", f"--mode={mode}", *overrides], check=True)


def main(argv):
  del argv
  rows = []
  print(f"{'trained on':>14} {'task':>5} {'evaluated on':>16} {'accuracy':>16}", flush=True)
  for name in FLAGS.cases:
    preset, overrides, other = CASES[name]
    workdir = os.path.join(FLAGS.out, name)
    _launch(preset, workdir, "train", *overrides)
    for shots in (1, 5):
      for data in ("", f"{other}:test"):
        _launch(preset, workdir, "eval", *overrides, f"--config.episode.shots={shots}",
                f"--config.eval.episodes={FLAGS.episodes}", *([f"--config.eval.data={data}"] if data else []))
        with open(os.path.join(workdir, "eval_test.json")) as f:
          written = json.load(f).values()
        result = next(r for r in written if r["shots"] == shots and r["episodes"] == FLAGS.episodes
                      and (r["eval_data"] == data if data else r["eval_data"].split(":")[0] == r["dataset"]))
        rows.append({"case": name, **result})
        print(f"{result['dataset']:>14} {'5w' + str(shots) + 's':>5} {result['eval_data']:>16} "
              f"{result['accuracy']:>8.2f} +- {result['ci95']:.2f}", flush=True)
  with open(os.path.join(FLAGS.out, "cross_domain.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
