"""One command for whoever has a GPU: every speed figure of the project into one JSON, in < 9 minutes.

  FEWSHOT_DATA_DIR=../shared/data python benchmarks/accelerator.py --out=/tmp/accelerator.json
  python benchmarks/accelerator.py --smoke --out=/tmp/smoke.json   # CPU, tiny cases, < 1 minute

Phases, each in its own process (the device's memory is free again after it)
under a time budget (--budgets, cut to what is left of --budget_s); a phase
that overruns is stopped and recorded as 'timeout' with what it had written,
one that fails as 'failed' with its last lines, one with no time left as
'skipped' with the reason:

  steps   benchmarks/steps.py on the device: compiled FLOPs / bytes / memory
          of every method's train step in float32 and bfloat16 (remat on and
          off for IDeMe-Net, where memory binds), each step run: ms/step,
          images/s, achieved FLOP/s, MFU against the stated peak, peak memory.
  torch   benchmarks/torch_vs_jax.py: the same training steps in JAX and in
          PyTorch on CUDA, eager and with torch.compile where it compiles.
  lgmnet  LGM-Net's miniImageNet reference schedule (configs/lgmnet.py:mini-5w1s:
          120,000 steps, meta-batch 32, one query per task) trained for
          --lgmnet_timed_steps, the rest projected from that run's step rate
          (validation included); resumed to the end only when the projection is
          under --lgmnet_full_max_s and fits the time left; then test accuracy
          of what was trained under eval.protocol 'standard' and 'reference'
          (what launch.py --mode=eval computes).

--smoke runs the same code on the CPU with the synthetic dataset and tiny
cases, so the test suite keeps this command working (tests/test_accelerator.py).
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PHASES = ("steps", "torch", "lgmnet")
flags.DEFINE_string("out", None, "Write the JSON here.", required=True)
flags.DEFINE_bool("smoke", False, "CPU check of the same code path: tiny cases, synthetic data.")
flags.DEFINE_list("phases", list(PHASES), f"Phases to run, of {PHASES}.")
flags.DEFINE_integer("budget_s", 540, "Wall-clock budget of the whole command (9 minutes).")
flags.DEFINE_list("budgets", ["steps=170", "torch=110"], "Per-phase budgets in seconds; lgmnet gets the rest.")
flags.DEFINE_integer("lgmnet_timed_steps", 3000, "Steps of the timed LGM-Net run (its projection's basis).")
flags.DEFINE_integer("lgmnet_full_max_s", 300, "Run the whole LGM-Net schedule only when projected under this.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for the prepared miniImageNet (default: the config's).")
flags.DEFINE_string("workdir", None, "LGM-Net workdir (default: a fresh temporary directory).")
flags.DEFINE_enum("phase", None, ["lgmnet"], "Internal: run one in-process phase and write its JSON to --out.")
FLAGS = flags.FLAGS

_STEPS_CASES = ["protonet:omniglot-5w1s", "protonet:mini-5w5s", "matchingnet:mini-5w1s", "lgmnet:omniglot-20w1s",
                "lgmnet:mini-5w1s"]
_STEPS_REMAT_CASES = ["idemenet:pretrain:data.input_size=224", "idemenet:mini-5w5s:data.input_size=224"]
_TORCH_CASES = ["protonet-omniglot-5w1s", "protonet-mini-5w5s", "lgmnet-mini-5w1s", "idemenet-5w1s",
                "idemenet-5w1s-train-e"]


def step_commands(smoke: bool, json_dir: str) -> list[tuple[list[str], str]]:
  """(argv, json path) of each steps.py run: float32 and bfloat16, remat on/off only for IDeMe-Net."""
  script = os.path.join(REPO, "benchmarks", "steps.py")
  if smoke:
    return [([script, "--cases=protonet:synthetic:episode.train_ways=5", "--dtypes=float32", "--remats=False",
              "--per_class=20", "--warmup=1", "--iters=2"], os.path.join(json_dir, "steps.json"))]
  return [([script, f"--cases={','.join(_STEPS_CASES)}", "--remats=False"], os.path.join(json_dir, "steps.json")),
          ([script, f"--cases={','.join(_STEPS_REMAT_CASES)}", "--remats=False,True"],
           os.path.join(json_dir, "steps_remat.json"))]


def torch_command(smoke: bool, json_path: str) -> list[str]:
  script = os.path.join(REPO, "benchmarks", "torch_vs_jax.py")
  if smoke:  # torch.compile's Dynamo tracing without Inductor's C++ build: the path, cheaply
    return [script, "--cases=protonet-omniglot-5w1s", "--steps=1", "--repeats=1", "--warmup=1", "--torch_compile",
            "--compile_backend=eager", f"--json={json_path}"]
  return [script, f"--cases={','.join(_TORCH_CASES)}", "--steps=10", "--repeats=3", "--warmup=3",
          "--torch_compile", f"--json={json_path}"]


def run_child(argv: list[str], timeout: float, env=None) -> dict:
  """{'status': 'ok' | 'failed' | 'timeout', 'seconds', 'tail'} of `python argv` under `timeout`."""
  start = time.time()
  try:
    done = subprocess.run([sys.executable] + argv, capture_output=True, text=True, timeout=max(1, timeout),
                          env=env, cwd=REPO)
    status = "ok" if done.returncode == 0 else "failed"
    tail = (done.stdout + done.stderr)[-3000:] if status == "failed" else done.stdout[-3000:]
  except subprocess.TimeoutExpired as e:
    status = "timeout"
    tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
  return {"status": status, "seconds": round(time.time() - start, 1), "tail": tail}


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def phase_steps(smoke: bool, budget: float, tmp: str) -> dict:
  result, rows, start = {"runs": []}, [], time.time()
  deadline = start + budget
  for argv, path in step_commands(smoke, tmp):
    left = deadline - time.time()
    if left < 10:
      result["runs"].append({"argv": argv[1:], "status": "skipped", "reason": f"{left:.0f} s of the budget left"})
      continue
    run = run_child(argv + [f"--json={path}"], left)
    run["argv"] = argv[1:]
    result["runs"].append(run)
    rows += read_json(path) or []
  result["rows"] = rows
  result["status"] = "ok" if all(r["status"] == "ok" for r in result["runs"]) else "incomplete"
  result["seconds"] = round(time.time() - start, 1)
  return result


def phase_torch(smoke: bool, budget: float, tmp: str) -> dict:
  path = os.path.join(tmp, "torch.json")
  result = run_child(torch_command(smoke, path), budget)
  result.update(read_json(path) or {"rows": []})
  return result


def phase_lgmnet(smoke: bool, budget: float, tmp: str) -> dict:
  """The LGM-Net schedule in a child process (this one never holds the device)."""
  path = os.path.join(tmp, "lgmnet.json")
  argv = [os.path.abspath(__file__), "--phase=lgmnet", f"--out={path}", f"--budget_s={int(budget)}",
          f"--lgmnet_timed_steps={FLAGS.lgmnet_timed_steps}", f"--lgmnet_full_max_s={FLAGS.lgmnet_full_max_s}",
          f"--workdir={FLAGS.workdir or os.path.join(tmp, 'lgmnet_workdir')}"]
  argv += (["--smoke"] if smoke else []) + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else [])
  result = run_child(argv, budget + 15)  # the child keeps its own budget; 15 s to write up
  result.update(read_json(path) or {})
  return result


# ----------------------------------------------------------------------------- LGM-Net (child process)


def lgmnet_config(smoke: bool, steps: int):
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_file(os.path.join(REPO, "configs", "lgmnet.py"), "synthetic" if smoke else "mini-5w1s")
  if FLAGS.data_dir:
    c.data.data_dir = FLAGS.data_dir
  if smoke:  # the same path at toy size: 6 steps of 2-way tasks, narrow networks, tiny evaluations
    c.model.features = 8
    c.method.update(z_dim=4, context_features=8, target_features=(8, 8))
    c.episode.update(ways=2, tasks=2)
    c.train.update(steps=6, eval_every=4, log_every=2, steps_per_call=2, checkpoint_every=4)
    c.eval.update(episodes=2, val_episodes=2, reference_tasks=2, tasks=2)
  schedule = c.train.steps
  c.train.steps = steps or schedule
  return c, schedule


def projection(marks: list[tuple[int, float]], start: float, total_steps: int) -> dict:
  """Step rate over the hooks after the first call (compilation excluded, validations included)
  and the seconds the rest of a `total_steps` schedule would take at that rate (with one call
  only, from the start: compilation included)."""
  (s0, t0), (s1, t1) = (marks[0] if len(marks) > 1 else (0, start)), marks[-1]
  per_step = (t1 - t0) / max(1, s1 - s0)
  return {"timed_steps": s1, "startup_s": round(t0 - start - per_step * s0, 1), "ms_per_step": 1000 * per_step,
          "remaining_steps": total_steps - s1, "projected_rest_s": round(per_step * (total_steps - s1), 1),
          "projected_total_s": round(per_step * total_steps + (t0 - start - per_step * s0), 1)}


def run_lgmnet_phase() -> dict:
  """Timed run, projection, full run when it fits, test accuracy under both protocols."""
  import jax  # pylint: disable=g-import-not-at-top
  from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fewshot_jax import train  # pylint: disable=g-import-not-at-top
  # The resumed run and the evaluations build new jitted functions of the same computations:
  # a persistent compilation cache makes those compilations lookups.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(FLAGS.workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  deadline = time.time() + FLAGS.budget_s
  smoke = FLAGS.smoke
  timed = 4 if smoke else FLAGS.lgmnet_timed_steps
  config, schedule = lgmnet_config(smoke, timed)
  out = {"preset": "synthetic" if smoke else "mini-5w1s", "schedule_steps": schedule,
         "meta_batch": config.episode.tasks, "queries": config.episode.queries,
         "query_sampling": config.episode.query_sampling, "device": jax.devices()[0].device_kind}
  marks = []
  start = time.time()
  train.train_and_evaluate(config, FLAGS.workdir, hooks=[lambda step, state: marks.append((step, time.time()))])
  out["timed_run_s"] = round(time.time() - start, 1)
  out.update(projection(marks, start, schedule))
  left = deadline - time.time()
  eval_reserve = 30 if smoke else 60
  if out["projected_rest_s"] >= FLAGS.lgmnet_full_max_s:
    out["full_run"] = {"status": "skipped", "reason": f"projected {out['projected_total_s']:.0f} s for the whole "
                       f"schedule (rest {out['projected_rest_s']:.0f} s) >= {FLAGS.lgmnet_full_max_s} s"}
  elif out["projected_rest_s"] + out["startup_s"] + eval_reserve > left:
    out["full_run"] = {"status": "skipped", "reason": f"the rest needs about {out['projected_rest_s']:.0f} s "
                       f"(+ {out['startup_s']:.0f} s start-up, {eval_reserve} s evaluation); {left:.0f} s of the "
                       "budget left"}
  else:
    config, _ = lgmnet_config(smoke, 0)
    start = time.time()
    train.train_and_evaluate(config, FLAGS.workdir)  # resumes the timed run's checkpoint
    out["full_run"] = {"status": "ok", "seconds": round(time.time() - start, 1), "steps": schedule}
  out["test"] = {}
  for protocol in ("standard", "reference"):
    if deadline - time.time() < (5 if smoke else 20):
      out["test"][protocol] = {"status": "skipped", "reason": "no time left in the budget"}
      continue
    config, _ = lgmnet_config(smoke, 0)
    config.eval.update(protocol=protocol, checkpoint="latest")
    start = time.time()
    result = evaluate.evaluate_checkpoint(config, FLAGS.workdir)
    out["test"][protocol] = {"status": "ok", "seconds": round(time.time() - start, 1),
                             **{k: result[k] for k in ("accuracy", "ci95", "episodes", "step", "protocol")
                                if k in result}}
  return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
  info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
  try:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    info["gpus"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    info["gpus"] = []
  return info


def parse_budgets(items) -> dict:
  return {k: float(v) for k, v in (item.split("=") for item in items)}


def main(argv):
  del argv
  if FLAGS.phase == "lgmnet":
    from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top
    xla_setup.set_cpu_defaults()
    with open(FLAGS.out, "w") as f:
      json.dump(run_lgmnet_phase(), f, indent=2)
    return
  unknown = set(FLAGS.phases) - set(PHASES)
  if unknown:
    raise app.UsageError(f"--phases {sorted(unknown)} unknown; valid: {list(PHASES)}")
  start = time.time()
  budgets = parse_budgets(FLAGS.budgets)
  report = {"smoke": FLAGS.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": FLAGS.budget_s,
            "machine": machine(), "mfu_peaks": "benchmarks/steps.py PEAK_FLOPS (H100/H200 SXM: 989e12 bf16 dense, "
                                               "67e12 fp32 non-tensor)", "phases": {}}
  runners = {"steps": phase_steps, "torch": phase_torch, "lgmnet": phase_lgmnet}
  with tempfile.TemporaryDirectory() as tmp:
    for name in PHASES:
      if name not in FLAGS.phases:
        continue
      left = FLAGS.budget_s - (time.time() - start)
      budget = min(budgets.get(name, left), left)
      if budget < 20:
        report["phases"][name] = {"status": "skipped",
                                  "reason": f"{left:.0f} s of the {FLAGS.budget_s} s budget left"}
      else:
        report["phases"][name] = runners[name](FLAGS.smoke, budget, tmp)
        report["phases"][name]["budget_s"] = round(budget)
      print(f"{name}: {report['phases'][name]['status']} "
            f"({report['phases'][name].get('seconds', 0)} s)", flush=True)
      report["total_s"] = round(time.time() - start, 1)
      with open(FLAGS.out, "w") as f:  # after every phase: a killed run keeps what it measured
        json.dump(report, f, indent=2)
  print(f"wrote {FLAGS.out} ({report['total_s']} s)")


if __name__ == "__main__":
  app.run(main)
