"""What a training step costs: FLOPs, bytes and memory of the compiled step, and its speed when run.

For each case the jitted train step (episode sampling, forward, backward,
update) is lowered and compiled for this backend, in float32 and bfloat16
(model.dtype), with and without rematerialisation (model.remat). XLA's cost
analysis gives the FLOPs and the bytes accessed per step; its memory analysis
the arguments (train state + device-resident training split), outputs,
temporaries and their sum, the peak estimate. With --run (default) the same
compiled step then runs on a real train state and a random on-device split of
the same shape: ms/step (median of --iters after --warmup), images/s (the
episode's or batch's images), achieved FLOP/s (XLA's FLOPs / step time), on a
GPU of known peak the model FLOP utilisation (PEAK_FLOPS, or --peak_flops),
and the device's peak_bytes_in_use (memory_stats(); None on the CPU). Prints a
markdown table; --json writes the rows (rewritten after every row, so a run cut
short keeps what it measured).

  python benchmarks/steps.py
  python benchmarks/steps.py --cases="idemenet:mini-5w5s:data.input_size=224" --dtypes=float32,bfloat16
  python benchmarks/steps.py --norun   # compile only

Cases and the training split (--classes, --per_class) are given as in
benchmarks/collectives.py.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import collectives  # pylint: disable=g-import-not-at-top  (sets the XLA:CPU defaults)
from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
from fewshot_jax import state as state_lib
from fewshot_jax import train

_DEFAULT = ["protonet:omniglot-5w1s", "protonet:mini-5w5s", "matchingnet:mini-5w1s", "lgmnet:omniglot-20w1s",
            "lgmnet:mini-5w1s", "idemenet:pretrain:data.input_size=224",
            "idemenet:mini-5w5s:data.input_size=224"]
flags.FLAGS.set_default("cases", _DEFAULT)  # --cases, --classes, --per_class, --json: collectives.py's flags
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values.")
flags.DEFINE_list("remats", ["False", "True"], "model.remat values.")
flags.DEFINE_bool("run", True, "Also run each compiled step (ms/step, images/s, FLOP/s, MFU, peak memory).")
flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (--run).")
flags.DEFINE_integer("iters", 10, "Timed steps, each to completion; the median is reported (--run).")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s of one device for the MFU column; 0: PEAK_FLOPS by device kind.")
FLAGS = flags.FLAGS

# Dense peak FLOP/s of one device, by a substring of its device_kind, per model.dtype. H100 / H200
# SXM: 989 TFLOP/s bfloat16 on the tensor cores (NVIDIA's dense figure, no sparsity); float32
# against 67 TFLOP/s, the FP32 non-tensor-core peak (XLA may run float32 convolutions and
# matmuls as TF32, whose dense peak is 495 TFLOP/s: a float32 MFU above 1 would say so).
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12}}


def peak_flops(device, dtype: str) -> float | None:
  """The peak the MFU column divides by: --peak_flops, else PEAK_FLOPS for this GPU, else None."""
  if FLAGS.peak_flops:
    return FLAGS.peak_flops
  kind = device.device_kind if device.platform == "gpu" else ""
  return next((p[dtype] for name, p in PEAK_FLOPS.items() if name in kind), None)


_DATASETS = {}  # one random split per shape, kept across rows


def random_dataset(abstract, key):
  """A split of `abstract`'s shapes and shardings on the device: random pixels, every class full."""
  classes, per_class = abstract.class_index.shape
  if abstract.images.shape in _DATASETS:
    return _DATASETS[abstract.images.shape]

  def make():
    return abstract.replace(
        images=jax.random.bits(key, abstract.images.shape, jnp.uint8),
        class_index=jnp.arange(classes * per_class, dtype=jnp.int32).reshape(classes, per_class),
        class_counts=jnp.full((classes,), per_class, jnp.int32), class_ids=jnp.arange(classes, dtype=jnp.int32))

  _DATASETS.clear()  # the previous case's split is not needed again
  _DATASETS[abstract.images.shape] = jax.jit(make, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()
  return _DATASETS[abstract.images.shape]


def peak_bytes_in_use():
  """The first local device's peak_bytes_in_use since the process started (None where not reported)."""
  try:
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  except (NotImplementedError, RuntimeError):
    return None


def run_step(compiled, method, tx, example, abstract_data, mesh, images: int) -> dict:
  """ms/step (median of --iters single steps after --warmup) of `compiled` on a fresh train state."""
  state = jax.jit(lambda k: state_lib.init_state(method, tx, k, example),
                  out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  dataset = random_dataset(abstract_data, jax.random.key(1))
  key = jax.random.key(2)
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, dataset, key)
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.iters):
    start = time.perf_counter()
    state, metrics = compiled(state, dataset, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"ms_per_step": 1000 * seconds, "images_per_s": images / seconds, "loss": float(metrics["loss"]),
          "peak_bytes_in_use": peak_bytes_in_use()}


def measure(case: str, dtype: str, remat: bool) -> dict:
  mesh = sharding.make_mesh()
  case_with = case + (";" if case.count(":") > 1 else ":") + f"model.dtype={dtype};model.remat={remat}"
  c = collectives.case_config(case_with, "replicated", mesh.size)
  method, tx, example, state, dataset = collectives.abstract_step(c, mesh)
  rep = sharding.replicated(mesh)
  start = time.time()
  compiled = jax.jit(train.make_step(method, tx, c, mesh), out_shardings=rep, donate_argnums=0).lower(
      state, dataset, jax.random.key(0)).compile()
  seconds = time.time() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  data_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dataset))
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  batch = {x.shape[0] for x in jax.tree.leaves(example)}.pop()  # tasks, or images for pretraining
  row = {"case": case, "dtype": dtype, "remat": remat, "batch": batch, "compile_s": round(seconds, 1),
         "flops": cost.get("flops", 0.0), "bytes_accessed": cost.get("bytes accessed", 0.0),
         "argument_bytes": mem.argument_size_in_bytes, "dataset_bytes": int(data_bytes),
         "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
         "temp_bytes": mem.temp_size_in_bytes, "peak_estimate_bytes": peak,
         "images_per_step": int(state_lib.images_per_task(example, 1))}
  if FLAGS.run:
    row.update(run_step(compiled, method, tx, example, dataset, mesh, row["images_per_step"]))
    row["flops_per_s"] = row["flops"] / (row["ms_per_step"] / 1000)
    device_peak = peak_flops(jax.devices()[0], dtype)
    row["peak_flops"] = device_peak
    row["mfu"] = row["flops_per_s"] / device_peak if device_peak else None  # XLA counts one device's FLOPs
  return row


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def table(rows) -> str:
  """The markdown table of `rows` (run columns when the rows have them)."""
  run = any("ms_per_step" in r for r in rows)
  head = ("| case | dtype | remat | batch (tasks or images) | GFLOP | GB accessed | arguments GB (of which data) |"
          " temporaries GB | peak estimate GB |")
  lines = [head + (" ms/step | images/s | achieved TFLOP/s | MFU | peak GB in use |" if run else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---:|---:|---:|---:|---:|" if run else "")]
  for r in rows:
    line = (f"| {r['case']} | {r['dtype']} | {'on' if r['remat'] else 'off'} | {r['batch']} | {r['flops'] / 1e9:.1f} | "
            f"{r['bytes_accessed'] / 1e9:.2f} | {r['argument_bytes'] / 1e9:.2f} ({r['dataset_bytes'] / 1e9:.2f}) | "
            f"{r['temp_bytes'] / 1e9:.2f} | {r['peak_estimate_bytes'] / 1e9:.2f} |")
    if run:
      peak = r.get("peak_bytes_in_use")
      line += (f" {_cell(r.get('ms_per_step'), '.1f')} | {_cell(r.get('images_per_s'), '.0f')} | "
               f"{_cell(r.get('flops_per_s') and r['flops_per_s'] / 1e12, '.3f')} | {_cell(r.get('mfu'), '.3f')} | "
               f"{_cell(peak and peak / 1e9, '.2f')} |")
    lines.append(line)
  return "\n".join(lines)


def platform_line() -> str:
  d = jax.devices()[0]
  return (f"{jax.device_count()} {d.platform} device(s) ({d.device_kind}), jax {jax.__version__}; per training "
          "step; memory estimates from XLA's compiled memory analysis")


def main(argv):
  del argv
  rows = []
  for case in FLAGS.cases:
    for dtype in FLAGS.dtypes:
      for remat in FLAGS.remats:
        rows.append(measure(case, dtype, remat == "True"))
        r = rows[-1]
        ran = f", {r['ms_per_step']:.1f} ms/step" if "ms_per_step" in r else ""
        print(f"  {case} {dtype} remat={remat}: compiled in {r['compile_s']} s{ran}", flush=True)
        if FLAGS.json:
          with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=2)
  print(platform_line())
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
