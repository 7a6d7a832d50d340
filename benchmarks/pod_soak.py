"""Pod soak: a multi-process job under random SIGTERMs and SIGKILLs ends exactly where an
uninterrupted one does.

N launch.py processes x K CPU devices on 127.0.0.1 run the synthetic preset (full-size validation
and test evaluations) in `train_eval` mode. First once uninterrupted (the reference). Then, until
--minutes are used up, faulted jobs: at random times a random process gets SIGTERM or SIGKILL, the
script waits for every process to end (a process still alive --hang_after seconds after a fault
counts as a HANG and is killed), relaunches the same command, and so on until the job ends with
exit 0 everywhere; its final parameters, Adam moments, best checkpoint and eval JSON are then
compared with the reference, bit for bit. Prints a table.

  python benchmarks/pod_soak.py --minutes=20 --processes=2 --devices=2
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

flags.DEFINE_float("minutes", 20.0, "Wall time of the faulted jobs (the reference run comes first).")
flags.DEFINE_integer("processes", 2, "Processes per job.")
flags.DEFINE_integer("devices", 2, "CPU devices per process.")
flags.DEFINE_integer("seed", 0, "Seed of the fault schedule.")
flags.DEFINE_float("min_gap", 20.0, "Least seconds from a (re)launch to its fault.")
flags.DEFINE_float("max_gap", 90.0, "Most seconds from a (re)launch to its fault.")
flags.DEFINE_float("hang_after", 150.0, "Seconds after a fault within which every process must have ended.")
flags.DEFINE_string("workdir", "", "Where jobs run (default: a temporary directory).")
flags.DEFINE_string("json", "", "Also write the rows and totals here.")
flags.DEFINE_multi_string("override", [], "Extra --config.KEY=VALUE flags for every launch.")
FLAGS = flags.FLAGS


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, logs, tag):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={FLAGS.devices}", JAX_PLATFORMS="cpu")
  address = f"127.0.0.1:{_port()}"
  base = [sys.executable, os.path.join(_REPO, "launch.py"),
          "--config=" + os.path.join(_REPO, "configs", "protonet.py") + ":synthetic", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--mode=train_eval"] + [f"--config.{o}" for o in FLAGS.override]
  procs = []
  for i in range(FLAGS.processes):
    cluster = ["--distributed", f"--coordinator_address={address}", f"--num_processes={FLAGS.processes}",
               f"--process_id={i}"] if FLAGS.processes > 1 else []
    procs.append(subprocess.Popen(base + cluster, env=env, cwd=_REPO, stdout=open(f"{logs}/{tag}_{i}.out", "w"),
                                  stderr=open(f"{logs}/{tag}_{i}.err", "w")))
  return procs


def _final(workdir, data_dir):
  """(step, parameter + optimiser leaves of the latest checkpoint, best step, eval JSON)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fewshot_jax import restore, sharding  # pylint: disable=g-import-not-at-top
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  c = load_config("protonet", "synthetic")
  c.data.data_dir = data_dir
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, latest = restore.load_for_eval(c, workdir, mesh, "latest")
  _, best = restore.load_for_eval(c, workdir, mesh, "best")
  with open(os.path.join(workdir, "eval_test.json")) as f:
    result = json.load(f)
  return (int(latest.step), [np.asarray(x) for x in jax.tree.leaves((latest.params, latest.opt_state))],
          int(best.step), result)


def _same(a, b) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return (a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and
          all(np.array_equal(x, y) for x, y in zip(a[1], b[1])))


def _faulted_job(workdir, data_dir, logs, rng, deadline, job):
  """Runs one job to its end under faults; returns its row."""
  row = {"job": job, "faults": 0, "sigterm": 0, "sigkill": 0, "restarts": 0, "hangs": 0, "exit_codes": []}
  start = time.time()
  launch = 0
  while True:
    procs = _launch(workdir, data_dir, logs, f"job{job}_{launch}")
    gap = rng.uniform(FLAGS.min_gap, FLAGS.max_gap)
    fault_at = time.time() + gap if time.time() + gap < deadline else None
    faulted = False
    while any(p.poll() is None for p in procs):
      if fault_at is not None and not faulted and time.time() >= fault_at:
        victim = rng.randrange(len(procs))
        sig = rng.choice((signal.SIGTERM, signal.SIGKILL))
        if procs[victim].poll() is None:
          procs[victim].send_signal(sig)
          faulted = True
          row["faults"] += 1
          row["sigterm" if sig == signal.SIGTERM else "sigkill"] += 1
          fault_time = time.time()
      if faulted and time.time() - fault_time > FLAGS.hang_after:
        row["hangs"] += 1
        for p in procs:
          if p.poll() is None:
            p.kill()
        break
      time.sleep(0.2)
    codes = [p.wait() for p in procs]
    row["exit_codes"].append(codes)
    if all(c == 0 for c in codes):
      break
    row["restarts"] += 1
    launch += 1
    if not faulted and row["restarts"] > 50:
      raise RuntimeError(f"job {job} fails without faults: exit codes {codes}; see {logs}")
  row["seconds"] = time.time() - start
  return row


def main(argv):
  del argv
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="pod_soak_")
  logs, data_dir = os.path.join(root, "logs"), os.path.join(root, "tfds")
  os.makedirs(logs, exist_ok=True)
  rng = random.Random(FLAGS.seed)
  t0 = time.time()
  codes = [p.wait() for p in _launch(os.path.join(root, "reference"), data_dir, logs, "reference")]
  if codes != [0] * FLAGS.processes:
    raise SystemExit(f"the uninterrupted reference failed: {codes}; see {logs}")
  reference_seconds = time.time() - t0
  reference = _final(os.path.join(root, "reference"), data_dir)
  deadline = time.time() + 60 * FLAGS.minutes
  rows, job = [], 0
  while time.time() < deadline:
    workdir = os.path.join(root, f"job{job}")
    row = _faulted_job(workdir, data_dir, logs, rng, deadline, job)
    row["identical"] = _same(_final(workdir, data_dir), reference)
    row["lost_per_fault"] = (row["seconds"] - reference_seconds) / row["faults"] if row["faults"] else 0.0
    rows.append(row)
    print(json.dumps(row), flush=True)
    job += 1
  faults = sum(r["faults"] for r in rows)
  totals = {"processes": FLAGS.processes, "devices": FLAGS.devices, "reference_seconds": reference_seconds,
            "jobs": len(rows), "faults": faults, "sigterm": sum(r["sigterm"] for r in rows),
            "sigkill": sum(r["sigkill"] for r in rows), "restarts": sum(r["restarts"] for r in rows),
            "hangs": sum(r["hangs"] for r in rows), "identical": sum(r["identical"] for r in rows),
            "lost_per_fault": (sum(r["seconds"] for r in rows) - reference_seconds * len(rows)) / max(faults, 1),
            "minutes": (time.time() - t0) / 60}
  print(f"\npod soak: {FLAGS.processes} processes x {FLAGS.devices} devices, synthetic preset (train_eval), "
        f"reference {reference_seconds:.0f} s\n")
  print("| job | faults (TERM/KILL) | restarts | hangs | wall s | s lost per fault | final state = reference |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    print(f"| {r['job']} | {r['faults']} ({r['sigterm']}/{r['sigkill']}) | {r['restarts']} | {r['hangs']} | "
          f"{r['seconds']:.0f} | {r['lost_per_fault']:.0f} | {'yes' if r['identical'] else 'NO'} |")
  print(f"| all | {faults} ({totals['sigterm']}/{totals['sigkill']}) | {totals['restarts']} | {totals['hangs']} | "
        f"{sum(r['seconds'] for r in rows):.0f} | {totals['lost_per_fault']:.0f} | "
        f"{totals['identical']}/{len(rows)} |")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"rows": rows, "totals": totals}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
