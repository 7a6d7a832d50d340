"""ProtoNet (Conv-4) presets: `--config=configs/protonet.py:<preset>`.

Omniglot follows Snell et al.: 60-way training episodes (episode.train_ways),
5 queries, Adam 1e-3 halved every 2000 episodes; the same model is evaluated at
5 or 20 ways. miniImageNet: 30-way (1-shot) / 20-way (5-shot) training, 15 queries.
CIFAR-FS, FC100 (32x32), tieredImageNet and CUB (84x84) use the miniImageNet recipe.
folder-*: your own images (data.manual_dir, a folder of class subfolders: docs/datasets.md), 84x84 RGB
(data.image_size, data.channels), normalised by its train split's statistics, the miniImageNet
recipe trained at the task's own way count (a folder's train split may hold fewer than 20 classes).
A preset's prefix names its dataset (the record's `preset`, data/registry.py), whose
record gives data.* (statistics, size; tieredImageNet's ~9.5 GB train split is
sharded over the devices: data.placement, README).
"""

from fewshot_jax import config as base
from fewshot_jax.data import registry

PRESETS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
           "mini-5w1s", "mini-5w5s", "cifarfs-5w1s", "cifarfs-5w5s", "fc100-5w1s", "fc100-5w5s",
           "tiered-5w1s", "tiered-5w5s", "cub-5w1s", "cub-5w5s", "folder-5w1s", "folder-5w5s", "synthetic")


def get_config(preset: str = "synthetic"):
  preset = base.check_preset(preset, PRESETS)
  c = base.base_config()
  c.method.name = "protonet"
  dataset, _, task = preset.partition("-")
  base.apply_dataset(c, registry.by_preset(dataset).name)
  if preset == "synthetic":
    c.episode.update(ways=5, shots=1, queries=5, tasks=2, train_ways=20)
    c.train.update(steps=300, eval_every=150, log_every=50, steps_per_call=25, decay_every=200)
    c.eval.update(episodes=600, val_episodes=200)
    return c
  ways, shots = (int(v) for v in task.rstrip("s").split("w"))
  c.episode.update(ways=ways, shots=shots)
  if dataset == "omniglot":  # the default (vinyals) split
    c.episode.update(queries=5, tasks=1, train_ways=60)
    if shots == 1:
      # 9000 x 60-way episodes, Adam halved every 2000 (Snell et al.): one run fits
      # 60 minutes of a 2-core CPU, validation included (README, Results).
      c.train.update(steps=9000, eval_every=500, log_every=100, decay_every=2000)
    else:
      # The 5-shot step is 1.6x longer: the earlier 3500-step schedule (README).
      c.train.update(steps=3500, eval_every=500, log_every=100, decay_every=1500)
    c.eval.update(val_episodes=300)
  else:
    c.episode.update(queries=15, tasks=1, train_ways=0 if dataset == "folder" else 30 if shots == 1 else 20)
    c.train.update(steps=30000, eval_every=1000, log_every=200, decay_every=2000)
  return c
