"""Loading a prepared split onto the devices with 1, 2, 4 ... processes on this machine.

Starts P processes (a JAX cluster on 127.0.0.1, gloo) of D CPU devices each; every
process loads the split as the trainer does (input_pipeline.load) and reports its
wall time, its peak resident memory (ru_maxrss) and the bytes each of its devices
holds. Prints one row per (processes, placement).

  FEWSHOT_DATA_DIR=../shared/data python benchmarks/load_split.py --data_dir=/tmp/tfds \
      --processes=1,2,4 --devices=2 --placements=replicated,sharded

The split is prepared first (once) if needed.
"""

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_string("config", "protonet:mini-5w5s", "method:preset whose data.* is loaded.")
flags.DEFINE_string("split", "train", "Split to load.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: the config's).")
flags.DEFINE_list("processes", ["1", "2", "4"], "Process counts to measure.")
flags.DEFINE_integer("devices", 2, "CPU devices per process.")
flags.DEFINE_list("placements", ["replicated", "sharded"], "data.placement values to measure.")
flags.DEFINE_integer("worker", -1, "Internal: run as process WORKER of a cluster.")
flags.DEFINE_integer("num", 1, "Internal: processes in the cluster.")
flags.DEFINE_string("coordinator", "", "Internal: coordinator address.")
flags.DEFINE_string("placement", "replicated", "Internal: placement of this worker.")
FLAGS = flags.FLAGS


def _config():
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  method, preset = FLAGS.config.split(":")
  c = config_lib.load_file(os.path.join(REPO, "configs", f"{method}.py"), preset)
  if FLAGS.data_dir:
    c.data.data_dir = FLAGS.data_dir
  return c


def worker():
  """One process: join the cluster, load, report JSON on stdout."""
  from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top
  xla_setup.set_cpu_defaults()
  import inspect  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import episodes, input_pipeline  # pylint: disable=g-import-not-at-top
  if FLAGS.num > 1:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num, FLAGS.worker,
                               coordinator_bind_address=FLAGS.coordinator)
  c = _config()
  c.data.placement = FLAGS.placement
  mesh = sharding.make_mesh()
  builder = input_pipeline.builder_from_config(c)
  start = time.time()
  if "placement" in inspect.signature(episodes.load_split).parameters:
    dataset = episodes.load_split(builder, FLAGS.split, mesh, FLAGS.placement)
  else:  # the trees before per-process placement (commit b09d4d6): replicated by jax.device_put
    dataset = episodes.load_split(builder, FLAGS.split, sharding.replicated(mesh))
  jax.block_until_ready(dataset)
  seconds = time.time() - start
  per_device = {}
  for leaf in jax.tree.leaves(dataset):
    for shard in leaf.addressable_shards:
      per_device[str(shard.device)] = per_device.get(str(shard.device), 0) + shard.data.nbytes
  print(json.dumps({"process": jax.process_index(), "seconds": seconds, "images": int(dataset.images.shape[0]),
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "device_bytes": max(per_device.values())}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def measure(processes: int, placement: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={FLAGS.devices}",
             JAX_PLATFORMS="cpu")
  coordinator = f"127.0.0.1:{_free_port()}"
  args = [sys.executable, os.path.abspath(__file__), f"--config={FLAGS.config}", f"--split={FLAGS.split}",
          f"--num={processes}", f"--coordinator={coordinator}", f"--placement={placement}"]
  if FLAGS.data_dir:
    args.append(f"--data_dir={FLAGS.data_dir}")
  procs = [subprocess.Popen(args + [f"--worker={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True) for i in range(processes)]
  try:
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  return {"processes": processes, "placement": placement, "devices": processes * FLAGS.devices,
          "images": reports[0]["images"], "seconds": max(r["seconds"] for r in reports),
          "peak_rss_per_process_bytes": max(r["peak_rss_bytes"] for r in reports),
          "peak_rss_total_bytes": sum(r["peak_rss_bytes"] for r in reports),
          "bytes_per_device": max(r["device_bytes"] for r in reports)}


def main(argv):
  del argv
  if FLAGS.worker >= 0:
    return worker()
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.builder_from_config(_config())  # prepare once, outside the timing
  rows = [measure(int(p), placement) for placement in FLAGS.placements for p in FLAGS.processes]
  print(f"{FLAGS.config} split {FLAGS.split}; {FLAGS.devices} CPU devices per process; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
  print("| placement | processes | devices | load time (s) | peak RSS per process (GB) | peak RSS, all (GB) |"
        " dataset bytes per device (MB) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['placement']} | {r['processes']} | {r['devices']} | {r['seconds']:.1f} | "
          f"{r['peak_rss_per_process_bytes'] / 1e9:.2f} | {r['peak_rss_total_bytes'] / 1e9:.2f} | "
          f"{r['bytes_per_device'] / 1e6:.1f} |")


if __name__ == "__main__":
  app.run(main)
