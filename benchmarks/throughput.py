"""Training-step throughput of ProtoNet (or any method/preset) on the current backend.

Times the real jitted train call (on-device sampling + augmentation + forward +
backward + Adam update, `steps` steps per call under lax.scan) on the real data
and prints a markdown table: ms/step, episodes/s, images/s.

  FEWSHOT_DATA_DIR=../shared/data python benchmarks/throughput.py
  python benchmarks/throughput.py --cases=protonet:omniglot-5w1s:5:1:5:1
"""

import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()  # as launch.py: before JAX creates its backend

from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import train
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline

# method:preset:ways:shots:queries:tasks (the training episode that is timed)
_DEFAULT = ["protonet:omniglot-5w1s:5:1:5:1", "protonet:omniglot-5w1s:60:1:5:1",
            "protonet:omniglot-20w5s:20:5:5:1", "protonet:omniglot-20w5s:60:5:5:1",
            "protonet:mini-5w5s:5:5:15:1", "protonet:mini-5w5s:20:5:15:1"]
flags.DEFINE_list("cases", _DEFAULT, "method:preset:ways:shots:queries:tasks, comma separated.")
flags.DEFINE_integer("steps", 10, "Steps per jitted call (lax.scan).")
flags.DEFINE_integer("calls", 3, "Timed calls after one warm-up call.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for prepared data (default: config's).")
flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "matmul_wgrad"], "model.conv_impl of every case.")
flags.DEFINE_enum("loop", "auto", ["auto", "scan", "python"], "train.loop of every case.")
flags.DEFINE_list("set", [], "Config overrides of every case, KEY=VALUE (e.g. method.task_conv=vmap).")
FLAGS = flags.FLAGS


def load_config(method, preset):
  return config_lib.load_file(os.path.join(REPO, "configs", f"{method}.py"), preset)


def time_case(case: str, datasets: dict) -> dict:
  method_name, preset, ways, shots, queries, tasks = case.split(":")
  ways, shots, queries, tasks = int(ways), int(shots), int(queries), int(tasks)
  c = load_config(method_name, preset)
  if FLAGS.data_dir:
    c.data.data_dir = FLAGS.data_dir
  c.episode.update(ways=ways, shots=shots, queries=queries, tasks=tasks, train_ways=0)
  c.model.conv_impl = FLAGS.conv_impl
  c.train.loop = FLAGS.loop
  for item in FLAGS.set:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    c[section][name] = type(c[section][name])(value)
  mesh = sharding.make_mesh()
  key = (c.data.name, c.data.split)
  if key not in datasets:
    datasets[key] = input_pipeline.load(c, c.data.train_split, mesh)
  data = datasets[key]
  method = methods.build(c)
  tx = state_lib.optimizer_for(method, c)  # the method's own optimiser where it has one, as the trainer
  example = episodes.episode_shapes(ways, shots, queries, tasks, input_pipeline.input_shape(c))
  st = jax.jit(lambda k: state_lib.init_state(method, tx, k, example),
               out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  fn = train.make_train_fn(method, tx, c, mesh)
  st, m = fn(st, data, jax.random.key(1), FLAGS.steps)
  jax.block_until_ready(st)
  start = time.perf_counter()
  for _ in range(FLAGS.calls):
    st, m = fn(st, data, jax.random.key(1), FLAGS.steps)
  jax.block_until_ready(st)
  seconds = (time.perf_counter() - start) / (FLAGS.calls * FLAGS.steps)
  images = tasks * ways * (shots + queries)
  return dict(case=f"{method_name} {preset}", episode=f"{ways}w{shots}s{queries}q x{tasks}",
              ms=1000 * seconds, eps=tasks / seconds, ips=images / seconds)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} device={device.device_kind} "
        f"cpus={os.cpu_count()} jax={jax.__version__} machine={platform.machine()} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} conv_impl={FLAGS.conv_impl} loop={FLAGS.loop} "
        f"set={FLAGS.set}")
  rows, datasets = [], {}
  for case in FLAGS.cases:
    rows.append(time_case(case, datasets))
    r = rows[-1]
    print(f"  {r['case']} {r['episode']}: {r['ms']:.1f} ms/step", flush=True)
  print("\n| method / preset | training episode | ms/step | episodes/s | images/s |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['case']} | {r['episode']} | {r['ms']:.1f} | {r['eps']:.2f} | {r['ips']:.0f} |")


if __name__ == "__main__":
  app.run(main)
