"""What a training step costs, from the compiled step alone (nothing is run): FLOPs, bytes, memory.

For each case the jitted train step (episode sampling, forward, backward,
update) is lowered and compiled for this backend, in float32 and bfloat16
(model.dtype) and, where the model has it, with and without
rematerialisation (model.remat). XLA's cost analysis gives the FLOPs and the
bytes accessed per step; its memory analysis the arguments (train state +
device-resident training split), outputs, temporaries and their sum, the
peak estimate. Prints a markdown table; --json writes the rows.

  python benchmarks/steps.py
  python benchmarks/steps.py --cases="idemenet:mini-5w5s:data.input_size=224" --dtypes=float32,bfloat16

Cases and the abstract training split (--classes, --per_class) are given as in
benchmarks/collectives.py. Step times, images/s and FLOP utilisation need a
run of the step: benchmarks/throughput.py (not part of this table).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import collectives  # pylint: disable=g-import-not-at-top  (sets the XLA:CPU defaults)
from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
from fewshot_jax import train

_DEFAULT = ["protonet:omniglot-5w1s", "protonet:mini-5w5s", "matchingnet:mini-5w1s", "lgmnet:omniglot-20w1s",
            "lgmnet:mini-5w1s", "idemenet:pretrain:data.input_size=224",
            "idemenet:mini-5w5s:data.input_size=224"]
flags.FLAGS.set_default("cases", _DEFAULT)  # --cases, --classes, --per_class, --json: collectives.py's flags
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.dtype values.")
FLAGS = flags.FLAGS


def measure(case: str, dtype: str, remat: bool | None) -> dict:
  mesh = sharding.make_mesh()
  extra = f"model.dtype={dtype}" + (f";model.remat={remat}" if remat is not None else "")
  case_with = case + (";" if case.count(":") > 1 else ":") + extra
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
  return {"case": case, "dtype": dtype, "remat": remat, "batch": batch, "compile_s": round(seconds, 1),
          "flops": cost.get("flops", 0.0), "bytes_accessed": cost.get("bytes accessed", 0.0),
          "argument_bytes": mem.argument_size_in_bytes, "dataset_bytes": int(data_bytes),
          "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
          "temp_bytes": mem.temp_size_in_bytes, "peak_estimate_bytes": peak}


def main(argv):
  del argv
  rows = []
  for case in FLAGS.cases:
    has_remat = "remat" in collectives.case_config(case, "replicated", 1).model
    for dtype in FLAGS.dtypes:
      for remat in ((False, True) if has_remat else (None,)):
        rows.append(measure(case, dtype, remat))
        print(f"  {case} {dtype} remat={remat}: compiled in {rows[-1]['compile_s']} s", flush=True)
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}), "
        f"jax {jax.__version__}; per training step; memory from XLA's compiled memory analysis")
  print("| case | dtype | remat | batch (tasks or images) | GFLOP | GB accessed | arguments GB (of which data) | temporaries GB |"
        " peak estimate GB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    remat = "-" if r["remat"] is None else ("on" if r["remat"] else "off")
    print(f"| {r['case']} | {r['dtype']} | {remat} | {r['batch']} | {r['flops'] / 1e9:.1f} | "
          f"{r['bytes_accessed'] / 1e9:.2f} | {r['argument_bytes'] / 1e9:.2f} ({r['dataset_bytes'] / 1e9:.2f}) | "
          f"{r['temp_bytes'] / 1e9:.2f} | {r['peak_estimate_bytes'] / 1e9:.2f} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
