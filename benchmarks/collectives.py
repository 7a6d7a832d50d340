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
import re
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

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int, str]]:
  """(kind, bytes, result shape) of every collective in a compiled module's HLO text.

  Bytes are the size of the collective's result (for an all-gather the
  gathered tensor, for an all-reduce the reduced buffers), per device.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = _SHAPE.findall(m.group(1))
      size = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for dt, dims in shapes)
      found.append((m.group(2), size, " ".join(f"{dt}[{dims}]" for dt, dims in shapes)))
  return found


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
  c.train.loop = "scan"
  if not hasattr(config_lib, "fit_to_devices"):  # the tree before the pods work (b09d4d6), for "before" figures
    c.episode.tasks = -(-c.episode.tasks // devices) * devices
    return c
  c.data.placement = placement
  return config_lib.fit_to_devices(c, devices)


def abstract_dataset(config, mesh, classes: int, per_class: int):
  """Shapes (with shardings) of a training split of `classes` x `per_class` images, as load_split places it."""
  size = config.data.image_size
  channels = input_pipeline.input_shape(config)[-1]
  shard = config.data.get("placement") == "sharded"
  rows = -(-classes * per_class // mesh.size) * mesh.size if shard else classes * per_class
  rep = sharding.replicated(mesh)
  s = lambda shape, dtype, sh=rep: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  placed = dict(mesh=mesh, sharded=shard) if "sharded" in episodes.DeviceDataset.__dataclass_fields__ else {}
  return episodes.DeviceDataset(
      images=s((rows, size, size, channels), jnp.uint8, sharding.task_sharded(mesh) if shard else rep),
      class_index=s((classes, per_class), jnp.int32), class_counts=s((classes,), jnp.int32),
      class_ids=s((classes,), jnp.int32), **placed)


def abstract_step(c, mesh):
  """(method, tx, example batch, train state shapes, training split shapes) of config `c` on `mesh`."""
  method = methods.build(c)
  tx = state_lib.optimizer_for(method, c)
  example = state_lib.train_example(method, c)
  rep = sharding.replicated(mesh)
  state = jax.eval_shape(lambda k: state_lib.init_state(method, tx, k, example), jax.random.key(0))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
  return method, tx, example, state, abstract_dataset(c, mesh, FLAGS.classes, FLAGS.per_class)


def measure(case: str, placement: str) -> dict:
  mesh = sharding.make_mesh()
  c = case_config(case, placement, mesh.size)
  method, tx, example, state, dataset = abstract_step(c, mesh)
  rep = sharding.replicated(mesh)
  start = time.time()
  if hasattr(train, "make_step"):
    step = jax.jit(train.make_step(method, tx, c, mesh), out_shardings=rep)
    compiled = step.lower(state, dataset, jax.random.key(0)).compile()
  else:  # the tree before the pods work (b09d4d6): one step under lax.scan
    compiled = train.make_train_fn(method, tx, c, mesh).lower(state, dataset, jax.random.key(0), 1).compile()
  seconds = time.time() - start
  found = collectives(compiled.as_text())
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
             if k in r["collectives"] else "-" for k in COLLECTIVES]
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
