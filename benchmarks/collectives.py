"""Cross-device traffic of one training step, read from the compiled HLO (nothing is run).

Compiles the jitted train step of each case on every device of this process
(simulate D CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=D)
for each data placement, and prints per collective kind the number of ops and
the bytes per device per step, next to the sizes they should be compared with:
the gradient (parameter bytes) and the episode's uint8 images.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/collectives.py
  ... --cases=protonet:mini-5w5s --placements=sharded --json=/tmp/c.json

A case is method:preset[:key=value,...] with config overrides, e.g.
idemenet:mini-5w1s:data.input_size=84. episode.tasks is rounded up to the
device count as the trainer does.
"""

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()

from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import train
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline

_DEFAULT = ["protonet:mini-5w5s", "lgmnet:mini-5w1s", "idemenet:mini-5w1s:data.input_size=224"]
flags.DEFINE_list("cases", _DEFAULT, "method:preset[:key=value;key=value], comma separated.")
flags.DEFINE_list("placements", ["replicated", "sharded"], "data.placement values to compile.")
flags.DEFINE_integer("classes", 64, "Classes of the (abstract) training split.")
flags.DEFINE_integer("per_class", 600, "Images per class of the (abstract) training split.")
flags.DEFINE_string("json", None, "Also write the results here.")
FLAGS = flags.FLAGS


def case_config(case: str, placement: str, devices: int):
  method_name, preset, *rest = case.split(":")
  c = config_lib.load_file(os.path.join(REPO, "configs", f"{method_name}.py"), preset)
  for item in (rest[0].split(";") if rest else []):
    key, value = item.split("=")
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[last] = type(node[last])(value) if not isinstance(node[last], bool) else value == "True"
  c.data.placement = placement
  c.train.loop = "scan"
  return config_lib.fit_to_devices(c, devices)


def abstract_dataset(config, mesh, classes: int, per_class: int):
  """Shapes (with shardings) of a training split of `classes` x `per_class` images, as load_split places it."""
  size = config.data.image_size
  channels = input_pipeline.input_shape(config)[-1]
  shard = config.data.placement == "sharded"
  rows = -(-classes * per_class // mesh.size) * mesh.size if shard else classes * per_class
  rep = sharding.replicated(mesh)
  s = lambda shape, dtype, sh=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  return episodes.DeviceDataset(
      images=s((rows, size, size, channels), jnp.uint8, sharding.task_sharded(mesh) if shard else rep),
      class_index=s((classes, per_class), jnp.int32), class_counts=s((classes,), jnp.int32),
      class_ids=s((classes,), jnp.int32), mesh=mesh, sharded=shard)


def measure(case: str, placement: str) -> dict:
  mesh = sharding.make_mesh()
  c = case_config(case, placement, mesh.size)
  method = methods.build(c)
  tx = state_lib.optimizer_for(method, c)
  example = state_lib.train_example(method, c)
  rep = sharding.replicated(mesh)
  state = jax.eval_shape(lambda k: state_lib.init_state(method, tx, k, example), jax.random.key(0))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  dataset = abstract_dataset(c, mesh, FLAGS.classes, FLAGS.per_class)
  step = jax.jit(train.make_step(method, tx, c, mesh), out_shardings=rep)
  start = time.time()
  compiled = step.lower(state, dataset, jax.random.key(0)).compile()
  seconds = time.time() - start
  found = sharding.collectives(compiled.as_text())
  by_kind = {}
  for kind, size, shape in found:
    entry = by_kind.setdefault(kind, {"ops": 0, "bytes": 0, "largest": ""})
    entry["ops"] += 1
    entry["bytes"] += size
    if size >= max([s for k, s, _ in found if k == kind]):
      entry["largest"] = shape
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  raw = (c.data.image_size, c.data.image_size, input_pipeline.input_shape(c)[-1])
  leading = {x.shape[0] for x in jax.tree.leaves(example)}.pop()
  per_item = sum(int(np.prod(x.shape[1:-3])) for x in jax.tree.leaves(example) if x.ndim >= 4)
  return {"case": case, "placement": placement, "devices": mesh.size, "tasks": leading,
          "param_bytes": nbytes(state.params), "batch_stats_bytes": nbytes(state.model_state.get("batch_stats", {})),
          "episode_image_bytes": int(leading * per_item * np.prod(raw)), "compile_s": round(seconds, 1),
          "collectives": by_kind}


def main(argv):
  del argv
  rows = [measure(case, placement) for case in FLAGS.cases for placement in FLAGS.placements]
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}; bytes per device per step")
  print("| case | placement | tasks | all-reduce | all-gather | reduce-scatter | collective-permute | all-to-all |"
        " gradient (params) | episode images (uint8) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    cells = [f"{r['collectives'][k]['ops']} ops, {r['collectives'][k]['bytes'] / 1e6:.3f} MB"
             if k in r["collectives"] else "-" for k in sharding.COLLECTIVES]
    print(f"| {r['case']} | {r['placement']} | {r['tasks']} | {' | '.join(cells)} | "
          f"{r['param_bytes'] / 1e6:.3f} MB | {r['episode_image_bytes'] / 1e6:.3f} MB |")
  for r in rows:
    for kind, entry in r["collectives"].items():
      if kind != "all-reduce":
        print(f"  {r['case']} {r['placement']}: largest {kind} {entry['largest']}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
