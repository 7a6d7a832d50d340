"""Pods on one machine: several launch.py processes on 127.0.0.1 (gloo collectives), stopping on
signals, data placements, task counts for any device count, and the compiled step's cross-device
traffic on 8 simulated devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from fewshot_jax import restore
from fewshot_jax import evaluate
from fewshot_jax import sharding
from fewshot_jax import config as config_lib
from tests.conftest import REPO, load_config

# Small and quick: 5-way training on the synthetic preset at toy width (model.features=16: what is
# checked does not depend on width), checkpoints every 4 steps, 2 steps per host call; SGD at a small
# lr, as the 1-vs-8-device test. Gloo and in-process all-reduces sum the 4 devices' gradients in
# different orders, so 2 processes x 2 devices and 1 process x 4 devices are not bit-identical, only
# equal up to that rounding. Measured (jax 0.10.2, 2-core CPU), relative difference of the parameters
# at steps 4, 8, 12, 16: 3.1e-8, 4.9e-8, 6.2e-8, 7.1e-8, while one update moves them 2.8e-3 to 4e-3;
# _RTOL = 1e-6 is 14x the largest and ~3000x below one update. The rounding is not bounded over long
# runs (at width 64 it grew from 4e-7 at step 16 to 6e-6 at step 20, 1.5e-5 at 24 and 1.1e-2 after
# 40), hence 16 steps, short of that growth; every checkpoint is kept and compared.
_OVERRIDES = {"episode.train_ways": 5, "episode.queries": 2, "model.features": 16, "train.steps": 16,
              "train.eval_every": 8, "train.checkpoint_every": 4, "train.log_every": 4, "train.steps_per_call": 2,
              "train.keep_checkpoints": 12, "train.optimizer": "sgd", "train.lr": 1e-3,
              "eval.val_episodes": 16}  # test: the preset's 600 episodes
_CHECKPOINTS = (4, 8, 12, 16)
_RTOL = 1e-6
_TIMEOUT = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, logs, processes: int, devices: int, tag: str,
           placement: str = "replicated", extra=()) -> list[subprocess.Popen]:
  """`processes` launch.py processes of `devices` CPU devices each; stdout/stderr to files in logs.
  `extra`: flags after the defaults (a later flag wins)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1")
  args = [sys.executable, str(REPO / "launch.py"), "--config=" + str(REPO / "configs" / "protonet.py") + ":synthetic",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--mode=train_eval",
          f"--config.data.placement={placement}"]
  args += [f"--config.{k}={v}" for k, v in _OVERRIDES.items()] + list(extra)
  port = _free_port()
  procs = []
  for i in range(processes):
    cluster = ["--distributed", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}"] if processes > 1 else []
    out = open(logs / f"{tag}{i}.out", "w")
    err = open(logs / f"{tag}{i}.err", "w")
    procs.append(subprocess.Popen(args + cluster, env=env, stdout=out, stderr=err, cwd=str(REPO)))
  return procs


def _wait(procs, timeout=_TIMEOUT) -> list[int]:
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
  finally:
    for p in procs:  # cleanup by PID, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _config(data_dir):
  c = load_config("protonet", "synthetic")
  c.data.data_dir = data_dir
  for key, value in _OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _latest_params(config, workdir, step=None):
  _, state = restore.load_for_eval(config, str(workdir), sharding.make_mesh(), "latest", step=step)
  return int(state.step), np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])


def test_two_processes_train_and_evaluate_as_one(tmp_path):
  """2 processes x 2 devices, the images sharded over the 4 devices: train with validation and
  checkpoints, then evaluate the preset's 600 test episodes; the result matches 1 process x 4 devices
  with the images replicated (the same episodes from either placement), and files and data preparation
  happen once. (Stopping on SIGTERM / SIGKILL and resuming: tests/test_pods.py.)"""
  data_dir, logs, pod = str(tmp_path / "tfds"), tmp_path, tmp_path / "pod"
  codes = _wait(_start(pod, data_dir, logs, processes=2, devices=2, tag="pod", placement="sharded"))
  errs = [_read(logs / f"pod{i}.err") for i in range(2)]
  assert codes == [0, 0], errs
  # Every checkpoint checked the two processes' parameters bit for bit (multihost.check_replicas_agree).
  for step in _CHECKPOINTS:
    assert f"step {step}: parameters bit-identical on all 2 processes" in errs[0], step
  # Process 0 alone writes results and INFO lines; process 1 only warnings, prefixed.
  outs = [_read(logs / f"pod{i}.out") for i in range(2)]
  assert '"accuracy"' in outs[0] and '"accuracy"' not in outs[1]
  assert "validation accuracy" in errs[0] and "validation accuracy" not in errs[1]
  assert sorted(os.listdir(pod)) == ["best", "checkpoints", "config.json", "eval_test.json", "tb"]
  # The data was prepared once, by process 0, though both processes started on an empty data_dir.
  prepared = [l for e in errs for l in e.splitlines() if "Prepared fewshot_synthetic" in l]
  assert len(prepared) == 1 and "[process" not in prepared[0], prepared
  config = _config(data_dir)

  # The same training in one process of 4 devices, the images replicated.
  single = tmp_path / "single"
  assert _wait(_start(single, data_dir, logs, processes=1, devices=4, tag="single", extra=("--mode=train",))) == [0]
  # Every checkpoint: equal up to summation order (_RTOL, ~3000x below one update), so a wrong
  # gradient average, a different episode, or a replayed or skipped step shows; the run ends at 16.
  assert _latest_params(config, pod)[0] == _latest_params(config, single)[0] == _CHECKPOINTS[-1]
  for step in _CHECKPOINTS:
    (_, a), (_, b) = _latest_params(config, pod, step), _latest_params(config, single, step)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel <= _RTOL, (step, rel)

  # eval_test.json of the 2-process run equals a 1-process evaluation of the same checkpoint.
  written = json.loads(_read(pod / "eval_test.json"))
  result = evaluate.evaluate_checkpoint(config, str(pod))
  assert written == {"standard/5w1s/75q/best": json.loads(json.dumps(result))}


def test_compiled_steps_move_no_images_but_the_episode(tmp_path):
  """Every method's train step on 8 simulated devices: with replicated data only gradient and
  BatchNorm all-reduces cross devices; with sharded data, also at most the episode's uint8 images
  (a reduce-scatter) and the sampled indices."""
  out = tmp_path / "collectives.json"
  # MatchingNet is left out: its episode path and Conv-4 are ProtoNet's, only the head differs.
  cases = ["protonet:synthetic", "lgmnet:synthetic",
           "idemenet:mini-5w1s:data.input_size=32", "idemenet:pretrain:data.input_size=32;method.batch_size=16"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(REPO / "benchmarks" / "collectives.py"), f"--cases={','.join(cases)}",
                  "--per_class=20", f"--json={out}"], env=env, check=True, capture_output=True, timeout=600)
  rows = json.loads(_read(out))
  assert {(r["case"], r["placement"]) for r in rows} == {(c, p) for c in cases for p in ("replicated", "sharded")}
  for r in rows:
    kinds = r["collectives"]
    assert r["devices"] == 8 and r["tasks"] % 8 == 0
    # Gradients (at most the parameters) plus BatchNorm statistics: a small multiple of their size.
    assert kinds["all-reduce"]["bytes"] <= r["param_bytes"] + 4 * r["batch_stats_bytes"] + 4096, r
    assert "collective-permute" not in kinds and "all-to-all" not in kinds, r
    if r["placement"] == "replicated":
      assert set(kinds) == {"all-reduce"}, r
    else:
      drawn = 2 if "pretrain" in r["case"] else 1  # pretraining also draws a partner per image
      assert kinds["reduce-scatter"]["bytes"] * r["devices"] <= drawn * r["episode_image_bytes"], r
      assert kinds.get("all-gather", {"bytes": 0})["bytes"] <= 4 * r["tasks"] * 64, r  # indices at most


_PLACEMENTS = r"""
import json, sys, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, {repo!r})
from tests.conftest import load_config
from fewshot_jax import sharding
from fewshot_jax.data import augment, episodes, input_pipeline
c = load_config("protonet", "synthetic")
c.data.data_dir = {data_dir!r}
mesh = sharding.make_mesh()
builder = input_pipeline.builder_from_config(c)
data = {{p: episodes.load_split(builder, "train", mesh, p) for p in ("replicated", "sharded")}}
out = {{"devices": mesh.size, "rows": {{p: int(d.images.shape[0]) for p, d in data.items()}},
        "per_device": {{p: int(d.images.addressable_shards[0].data.shape[0]) for p, d in data.items()}}}}
aug = augment.from_config(c, 5)
sample = jax.jit(lambda key, d: episodes.sample_episodes(key, d, tasks=6, ways=5, shots=2, queries=3, augment=aug))
take = jax.jit(lambda d, i: episodes.take_images(d, i, scatter=False))
idx = np.arange(0, 4000, 37)
for p, d in data.items():
  ep = jax.device_get(sample(jax.random.key(7), d))
  out[p] = [np.asarray(x).tolist() for x in (ep.support, ep.query, ep.support_labels, ep.classes)]
  out[p + "_take"] = np.asarray(take(d, idx)).tolist()
out["host"] = [np.asarray(builder.as_data_source()["train"][int(i)]["image"]).tolist() for i in idx]
print(json.dumps(out))
"""


def test_replicated_and_sharded_placements_give_the_same_episodes(make_config):
  """3 devices (4000 images: the sharded array is padded to 4002 rows, 1334 per device): the
  same key samples identical episodes from either placement, and gathers return the stored images."""
  data_dir = make_config().data.data_dir
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _PLACEMENTS.format(repo=str(REPO), data_dir=data_dir)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["devices"] == 3
  assert out["rows"] == {"replicated": 4000, "sharded": 4002}
  assert out["per_device"] == {"replicated": 4000, "sharded": 1334}
  assert out["replicated"] == out["sharded"]
  assert len(set(map(str, out["replicated"][0]))) > 1  # tasks differ
  assert out["replicated_take"] == out["sharded_take"] == out["host"]


def test_ctrl_c_checkpoints_then_resumes_bit_identically(tmp_path):
  """One process: Ctrl-C (SIGINT) after the step-4 checkpoint stops at the next step boundary with a
  checkpoint and exit 130; rerunning finishes with the parameters of an uninterrupted run, bit for bit."""
  data_dir, logs = str(tmp_path / "tfds"), tmp_path
  # No test evaluation; the full width (64) keeps steps 4 to 16 long enough for the signal to land.
  short = ("--mode=train", "--config.train.steps=16", "--config.train.eval_every=8", "--config.model.features=64")
  assert _wait(_start(tmp_path / "full", data_dir, logs, processes=1, devices=1, tag="full", extra=short)) == [0]
  procs = _start(tmp_path / "cut", data_dir, logs, processes=1, devices=1, tag="cut", extra=short)
  try:
    deadline = time.time() + _TIMEOUT
    while "step 4/16" not in _read(logs / "cut0.err"):
      assert time.time() < deadline and procs[0].poll() is None, _read(logs / "cut0.err")[-3000:]
      time.sleep(0.1)
    procs[0].send_signal(signal.SIGINT)
  finally:
    codes = _wait(procs)
  err = _read(logs / "cut0.err")
  assert codes == [130], err[-3000:]
  assert "SIGINT received: checkpointing at the next step boundary" in err and "Traceback" not in err
  stopped_at = int(err.split("stopped by SIGINT after step ")[1].split(";")[0])
  assert 4 <= stopped_at < 16
  config = _config(data_dir)
  config.model.features = 64
  assert _latest_params(config, tmp_path / "cut")[0] == stopped_at
  assert _wait(_start(tmp_path / "cut", data_dir, logs, processes=1, devices=1, tag="resumed", extra=short)) == [0]
  (step_a, a), (step_b, b) = _latest_params(config, tmp_path / "full"), _latest_params(config, tmp_path / "cut")
  assert step_a == step_b == 16
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_presets_run_on_any_device_count():
  """episode.tasks / eval.tasks round up to multiples of 1, 2, 4, 8, 16 devices; LGM-Net's reference
  meta-batch of 32 stays 32; every training batch then splits evenly over the devices."""
  from fewshot_jax import methods, state as state_lib  # pylint: disable=g-import-not-at-top
  for method, presets in (("protonet", ("omniglot-5w1s", "mini-5w5s", "synthetic")),
                          ("lgmnet", ("omniglot-20w1s", "mini-5w1s")), ("idemenet", ("pretrain", "mini-5w1s"))):
    for preset in presets:
      base = load_config(method, preset)
      for devices in (1, 2, 4, 8, 16):
        c = config_lib.fit_to_devices(base, devices)
        for section in ("episode", "eval"):
          tasks, given = c[section].tasks, base[section].tasks
          assert tasks % devices == 0 and given <= tasks < given + devices, (method, preset, devices, section)
        example = state_lib.train_example(methods.build(c), c)
        assert all(x.shape[0] % devices == 0 for x in jax.tree.leaves(example)), (method, preset, devices)
      if (method, preset) == ("lgmnet", "mini-5w1s"):
        assert config_lib.fit_to_devices(base, 16).episode.tasks == 32
