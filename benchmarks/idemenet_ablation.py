"""IDeMe-Net: what each behaviour of the authors' code does, one short stage-2 run per variant.

From one stage-1 workdir, trains stage 2 (5-way 1-shot, E fixed: round 1)
once per variant through launch.py, with the same seed, then scores each
run's best-by-validation checkpoint on the same test episodes. Variants: the
reference (the preset: gallery_bn=train, gallery flip 0.5, centre crop 0.875)
and one change each. Prints accuracy +- 95% CI of the 'deformed' and 'plain'
modes and D's mean patch weight over the figure's episodes.

  python benchmarks/idemenet_ablation.py --pretrained=runs/ideme-pretrain-84 --out=runs/ablation \
      --steps=200 --episodes=600
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("pretrained", None, "Stage-1 workdir (configs/idemenet.py:pretrain).", required=True)
flags.DEFINE_string("out", None, "Folder for the variants' workdirs and ablation.json.", required=True)
flags.DEFINE_string("preset", "mini-5w1s", "Stage-2 preset of configs/idemenet.py.")
flags.DEFINE_integer("steps", 100, "Stage-2 episodes per run.")
flags.DEFINE_integer("episodes", 600, "Test episodes (the same for every variant).")
flags.DEFINE_integer("input_size", 84, "data.input_size (224 as the paper).")
flags.DEFINE_list("variants", ["reference", "gallery_bn_eval", "no_gallery_flip", "no_center_crop"],
                  "Which variants to run.")
FLAGS = flags.FLAGS

VARIANTS = {
    "reference": [],
    "gallery_bn_eval": ["--config.method.gallery_bn=eval"],
    "no_gallery_flip": ["--config.method.gallery_flip=0.0"],
    "no_center_crop": ["--config.data.center_crop=1.0"],
}


def main(argv):
  del argv
  common = [f"--config={os.path.join(REPO, 'configs', 'idemenet.py')}:{FLAGS.preset}",
            f"--config.data.input_size={FLAGS.input_size}", f"--config.method.pretrained={FLAGS.pretrained}",
            f"--config.train.steps={FLAGS.steps}", f"--config.train.eval_every={max(1, FLAGS.steps // 2)}",
            "--config.train.log_every=10", "--config.train.steps_per_call=10", "--config.eval.val_episodes=100",
            f"--config.eval.episodes={FLAGS.episodes}"]
  rows = {}
  print(f"{'variant':>16} {'deformed':>16} {'plain':>16} {'mean patch weight':>18}", flush=True)
  for name in FLAGS.variants:
    workdir = os.path.join(FLAGS.out, name)
    for mode in ("train", "eval"):
      subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), *common, *VARIANTS[name],
                      f"--workdir={workdir}", f"--mode={mode}"], check=True)
    with open(os.path.join(workdir, "eval_test.json")) as f:
      result = next(iter(json.load(f).values()))
    rows[name] = result
    fmt = lambda m: f"{result['modes'][m]['accuracy']:.2f} +- {result['modes'][m]['ci95']:.2f}"
    print(f"{name:>16} {fmt('deformed'):>16} {fmt('plain'):>16} {result['patch_weight_mean']:>18.3f}",
          flush=True)
  with open(os.path.join(FLAGS.out, "ablation.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
