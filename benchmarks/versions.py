"""Both ends of the supported JAX range, from a wheel, outside the checkout: one table row per JAX.

For each jax version: a fresh virtualenv, `pip install <our wheel> jax==V jaxlib==V`
(pip picks flax, optax, orbax, TFDS, numpy for that pin: the table shows
which), then from an empty directory:
  main     `fewshot-jax --workdir=W`: the main job (train, validate, test)
  2 dev    one process, 2 CPU devices, the split sharded over them (shard_map
           gathers): `--config=protonet:synthetic`, 40 steps, 600 test episodes
  2 proc   2 processes x 1 CPU device on a loopback coordinator (gloo, the
           watchdog's heartbeat): the same job with --distributed
A version written V:lowest also pins every other requirement of setup.cfg to its
declared minimum (the bottom of every range at once). The script prints
versions, install time, main-job test accuracy, wall times and
pass/fail (a run passes when it exits 0 and prints its result JSON; the 2-process
one when both agree on it). Run it before declaring a new range in setup.cfg:

  python benchmarks/versions.py --versions=0.7.1:lowest,0.7.1,0.8.1,0.9.0,0.10.2

Not part of the test suite (minutes per version, network for the wheels).
"""

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "numpy", "pillow",
            "etils", "absl-py", "ml-collections", "array-record", "tensorboardx")
SHORT = ["--config=protonet:synthetic", "--config.train.steps=40", "--config.train.eval_every=40",
         "--config.eval.val_episodes=40", "--config.eval.episodes=600"]

flags.DEFINE_list("versions", ["0.7.1:lowest", "0.7.1", "0.8.1", "0.9.0", "0.10.2"], "jax/jaxlib versions, one row each.")
flags.DEFINE_string("root", None, "Where the venvs and runs go (default: a temporary folder, removed).")
flags.DEFINE_string("json", None, "Also write the rows here.")
FLAGS = flags.FLAGS


def _run(cmd, cwd, env=None, timeout=1200):
  start = time.monotonic()
  p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  return p, time.monotonic() - start


def _result(out: str):
  lines = [l for l in out.splitlines() if l.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(root, **extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH", "VIRTUAL_ENV")}
  env.update(TFDS_DATA_DIR=os.path.join(root, "tfds"), **extra)
  return env


def lowest_pins() -> list[str]:
  """setup.cfg's install_requires, each at its declared minimum (jax and jaxlib left out)."""
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  pins = []
  for line in cfg["options"]["install_requires"].splitlines():
    m = re.match(r"([\w.\-\[\]]+)\s*(?:>=|==)\s*([\w.]+)", line.strip())
    if m and m.group(1) not in ("jax", "jaxlib"):
      pins.append(f"{m.group(1)}=={m.group(2)}")
  return pins


def row(spec: str, wheel: str, root: str) -> dict:
  version, _, lowest = spec.partition(":")
  venv = os.path.join(root, f"venv-{spec.replace(':', '-')}")
  subprocess.run([sys.executable, "-m", "venv", venv], check=True)
  pip = [os.path.join(venv, "bin", "python"), "-m", "pip"]
  pins = lowest_pins() if lowest else []
  p, install = _run(pip + ["install", "-q", wheel, f"jax=={version}", f"jaxlib=={version}"] + pins, cwd=root)
  r = {"jax": spec, "install_s": round(install)}
  if p.returncode:
    return dict(r, passed=False, why="install: " + p.stderr.strip().splitlines()[-1][:200])
  listed = json.loads(subprocess.run(pip + ["list", "--format=json"], capture_output=True, text=True,
                                     check=True).stdout)
  r["packages"] = {x["name"].lower(): x["version"] for x in listed if x["name"].lower() in PACKAGES}
  command = os.path.join(venv, "bin", "fewshot-jax")
  run_dir = os.path.join(root, f"run-{spec.replace(':', '-')}")  # not the checkout: the wheel's files only
  os.makedirs(run_dir)
  p, r["main_s"] = _run([command, f"--workdir={run_dir}/main"], cwd=run_dir, env=_env(root))
  main = _result(p.stdout) if p.returncode == 0 else None
  r["main_accuracy"] = main and round(main["accuracy"], 2)
  r["main_why"] = "" if main else p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else f"rc {p.returncode}"
  r["xla_note"] = next((l.split("] ", 1)[-1] for l in p.stderr.splitlines() if "XLA_FLAGS:" in l), "")
  p, r["two_devices_s"] = _run([command] + SHORT + [f"--workdir={run_dir}/two_devices",  # --config first
                                                   "--config.data.placement=sharded", "--config.episode.tasks=2"],
                               cwd=run_dir,
                               env=_env(root, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  two = _result(p.stdout) if p.returncode == 0 else None
  r["two_devices_accuracy"] = two and round(two["accuracy"], 2)
  r["two_devices_why"] = "" if two else (p.stderr.strip().splitlines() or [f"rc {p.returncode}"])[-1][:200]
  port = _free_port()
  procs = [subprocess.Popen([command, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}", f"--workdir={run_dir}/two_processes"] + SHORT,
                            cwd=run_dir, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  start = time.monotonic()
  try:
    outs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  r["two_processes_s"] = round(time.monotonic() - start)
  pod = _result(outs[0][0]) if all(p.returncode == 0 for p in procs) else None
  r["two_processes_accuracy"] = pod and round(pod["accuracy"], 2)
  r["two_processes_why"] = "" if pod else " | ".join(
      (e.strip().splitlines() or [f"rc {p.returncode}"])[-1][:150] for p, (_, e) in zip(procs, outs))
  r["kv_fallback"] = any("one-line failure on a lost peer is off" in e for _, e in outs)
  r["passed"] = bool(main and two and pod)
  for k in ("main_s", "two_devices_s"):
    r[k] = round(r[k])
  return r


def table(rows) -> str:
  out = ["| jax / jaxlib | flax | optax | orbax-checkpoint | TFDS | numpy, pillow, etils | install | main job: test acc., wall "
         "| 2 devices: acc., wall | 2 processes: acc., wall | result |", "|" + "---|" * 10]
  for r in rows:
    pk = r.get("packages", {})
    cell = lambda name: (f"{r[name + '_accuracy']:.2f} %, {r[name + '_s']} s" if r.get(name + "_accuracy") is not None
                         else f"FAIL: {r.get(name + '_why', '')}")
    out.append(f"| {r['jax']} | {pk.get('flax', '-')} | {pk.get('optax', '-')} | {pk.get('orbax-checkpoint', '-')} "
               f"| {pk.get('tensorflow-datasets', '-')} | {pk.get('numpy', '-')}, {pk.get('pillow', '-')}, {pk.get('etils', '-')} "
               f"| {r['install_s']} s "
               f"| {cell('main')} | {cell('two_devices')} | {cell('two_processes')} "
               f"| {'pass' if r['passed'] else 'FAIL ' + r.get('why', '')} |")
  notes = sorted({r["xla_note"] for r in rows if r.get("xla_note")})
  return "\n".join(out + [f"note: {n}" for n in notes])


def main(argv):
  del argv
  root = FLAGS.root or tempfile.mkdtemp(prefix="fewshot_versions_")
  os.makedirs(root, exist_ok=True)
  wheels = os.path.join(root, "wheel")
  start = time.monotonic()
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO], check=True,
                 cwd=root)
  shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)
  wheel = os.path.join(wheels, os.listdir(wheels)[0])
  print(f"wheel {os.path.basename(wheel)} built in {time.monotonic() - start:.0f} s", flush=True)
  rows = []
  for version in FLAGS.versions:
    rows.append(row(version, wheel, root))
    print(json.dumps(rows[-1]), flush=True)
  print(table(rows))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)
  if not FLAGS.root:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
