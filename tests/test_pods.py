"""Pods that finish: every multi-process phase completes, or ends every process in bounded time with
one line; evaluation does not depend on batching, devices or processes; resume after a fault equals
no fault, bit for bit. Several processes on 127.0.0.1 (gloo), each bounded in time and killed by PID."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from fewshot_jax import restore
from fewshot_jax import sharding
from tests import pod_eval
from tests.conftest import REPO, load_config
from tests.test_multiprocess import _free_port, _read, _wait

_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _procs(args_of, processes: int, devices: int, logs, tag: str) -> list[subprocess.Popen]:
  """`processes` subprocesses, args_of(i, coordinator) each, output in logs/<tag><i>.{out,err}."""
  env = dict(_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  address = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen(args_of(i, address), env=env, cwd=str(REPO), stdout=open(logs / f"{tag}{i}.out", "w"),
                           stderr=open(logs / f"{tag}{i}.err", "w")) for i in range(processes)]


def _eval_json(tmp_path, data_dir, counts: str, tasks: str, processes: int, devices: int, tag: str) -> dict:
  out = tmp_path / f"{tag}.json"

  def args(i, address):
    cluster = [address, str(processes), str(i)] if processes > 1 else []
    return [sys.executable, str(REPO / "tests" / "pod_eval.py"), str(out), data_dir, counts, tasks] + cluster

  codes = _wait(_procs(args, processes, devices, tmp_path, tag), timeout=480)
  assert codes == [0] * processes, [_read(tmp_path / f"{tag}{i}.err")[-2000:] for i in range(processes)]
  return json.loads(_read(out))


_COUNTS = {"protonet": 600, "matchingnet": 600, "lgmnet": 600, "idemenet": 32}


def test_every_method_scores_each_episode_alike_for_any_batching_and_process_count(tmp_path, make_config):
  """Every prediction mode of every method (random ones included: noise keyed by episode index), toy
  widths, fixed random weights. In this process on one device: 600 episodes (the presets' test size,
  which hung in a pod before: 150 batches of collective-bearing calls in flight) of ProtoNet,
  MatchingNet and LGM-Net and 32 of IDeMe-Net (its deformed mode is slow at 32 px on this CPU) at
  eval.tasks=8, and the first 48 (16) episodes at eval.tasks=1; then 2 processes x 2 devices at
  eval.tasks=8 (2 tasks per device, 8 per call here). Every episode must score alike in all of them.

  LGM-Net's ensemble is the one exception allowed: XLA:CPU may sum a convolution in another order for
  another batch size, and a vote of 10 draws flips where one draw's two best classes tie to float
  rounding (measured: 1 of 2,400 episode scores at tasks=2, and 1 of 600 in 2 processes at tasks=8).
  """
  data_dir = make_config().data.data_dir
  counts = ",".join(f"{k}={v}" for k, v in _COUNTS.items())
  pod = _eval_json(tmp_path, data_dir, counts, "8", 2, 2, "pod")
  mesh = sharding.make_mesh(jax.devices()[:1])
  modes = {"protonet": {"default"}, "matchingnet": {"default"}, "lgmnet": {"single", "mean", "ensemble"},
           "idemenet": {"deformed", "plain"}}
  for name, config in pod_eval._cases(data_dir).items():  # pylint: disable=protected-access
    scores = pod_eval.score(config, mesh, [(8, _COUNTS[name]), (1, 16 if name == "idemenet" else 48)])
    reference = scores[8]
    assert set(reference) == modes[name] and all(len(a) == _COUNTS[name] for a in reference.values())
    others = [(1, scores[1]), ("pod", pod["result"][name]["8"])]
    for tasks, got in others:
      assert set(got) == modes[name], (name, tasks)
      for mode, acc in got.items():
        acc = np.asarray(acc)
        differ = int(np.sum(acc != reference[mode][:len(acc)]))
        assert differ <= (1 if mode == "ensemble" else 0), (name, tasks, mode, differ)
    assert len(pod["result"][name]["8"][next(iter(modes[name]))]) == _COUNTS[name]
    if name == "lgmnet":  # the random modes draw noise: a single draw scores differently from the mean (z = mu)
      assert not np.array_equal(reference["single"], reference["mean"])
  assert (pod["processes"], pod["devices"]) == (2, 4)


def _launch(workdir, data_dir, extra=()):
  def args(i, address):
    return [sys.executable, str(REPO / "launch.py"), "--config=" + str(REPO / "configs" / "protonet.py") + ":synthetic",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--distributed",
            f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}", *extra]
  return args


# Adam (the default optimiser), checkpoints every 4 steps, validation every 8: short, toy width
# (model.features=16: resuming does not depend on width), and every update moves every parameter, so a
# replayed or skipped step, a wrong episode or a lost optimiser moment shows as a difference, not only
# within a tolerance.
_TRAIN = ("--mode=train", "--config.model.features=16", "--config.train.steps=16", "--config.train.eval_every=8",
          "--config.train.checkpoint_every=4", "--config.train.log_every=2", "--config.train.steps_per_call=2",
          "--config.eval.val_episodes=32")


def _params(workdir, which="latest"):
  """(step, leaves of the parameters and Adam's moments) of the latest or best checkpoint."""
  c = load_config("protonet", "synthetic")
  c.model.features = 16
  _, state = restore.load_for_eval(c, str(workdir), sharding.make_mesh(jax.devices()[:1]), which)
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]


def _fault(tmp_path, data_dir, tag, sig, target, extra=()) -> tuple[list[int], list[str], int]:
  """Starts the 2-process training, sends `sig` to process `target` once its step-4 checkpoint is
  written, waits for both to end (bounded), then relaunches the same command to the end."""
  work = tmp_path / tag
  procs = _procs(_launch(work, data_dir, _TRAIN + extra), 2, 2, tmp_path, tag)
  try:
    deadline = time.time() + 240
    while not (work / "checkpoints" / "4").is_dir():
      assert time.time() < deadline and all(p.poll() is None for p in procs), _read(tmp_path / f"{tag}0.err")[-3000:]
      time.sleep(0.2)
    procs[target].send_signal(sig)
    sent = time.time()
  finally:
    codes = _wait(procs, timeout=180)
  ended = time.time() - sent
  errs = [_read(tmp_path / f"{tag}{i}.err") for i in range(2)]
  assert ended < 90, (ended, errs)  # bounded: no process waits on its lost peer
  stopped_at = _params(work)[0]
  resumed = _wait(_procs(_launch(work, data_dir, _TRAIN), 2, 2, tmp_path, tag + "_again"), timeout=240)
  assert resumed == [0, 0], [_read(tmp_path / f"{tag}_again{i}.err")[-3000:] for i in range(2)]
  assert f"Resumed from {work / 'checkpoints'} at step {stopped_at}" in _read(tmp_path / f"{tag}_again0.err")
  return codes, errs, stopped_at


def test_resume_after_sigterm_or_sigkill_is_bit_identical_to_no_fault(tmp_path, make_config):
  data_dir = make_config().data.data_dir
  assert _wait(_procs(_launch(tmp_path / "clean", data_dir, _TRAIN), 2, 2, tmp_path, "clean"), 240) == [0, 0]
  step, clean = _params(tmp_path / "clean")
  assert step == 16

  codes, errs, stopped_at = _fault(tmp_path, data_dir, "term", signal.SIGTERM, 1)
  assert codes == [143, 143], errs  # both checkpoint the same step and stop
  stop_lines = [l for e in errs for l in e.splitlines() if l.startswith("stopped by SIGTERM after step")]
  assert len(stop_lines) == 2 and stop_lines[0] == stop_lines[1], stop_lines  # the same step on both
  # Checkpointed at the stop (not only at the cadence of 4) and resumed from there.
  assert stop_lines[0].startswith(f"stopped by SIGTERM after step {stopped_at};") and 4 <= stopped_at < 16
  assert "SIGTERM received" in errs[1] and "[process 1]" in errs[1]
  codes, errs, _ = _fault(tmp_path, data_dir, "kill", signal.SIGKILL, 1, ("--peer_timeout=10",))
  assert codes[1] == -signal.SIGKILL and codes[0] == 75, (codes, errs[0][-3000:])
  line = [l for l in errs[0].splitlines() if l.startswith("error:")]
  # A failed collective says so at once; a collective that waits instead is caught by the heartbeat.
  gone = ("a peer process is gone", "process 1 is gone (no heartbeat for 10 s")
  assert len(line) == 1 and any(g in line[0] for g in gone) and "the last checkpoint is step" in line[0], line
  assert "run the same command again (every process) to resume" in line[0]

  best_step, best = _params(tmp_path / "clean", "best")
  assert best_step in (8, 16)  # validated at 8 and 16
  for tag in ("term", "kill"):
    step, faulted = _params(tmp_path / tag)
    assert step == 16
    for a, b in zip(clean, faulted, strict=True):
      np.testing.assert_array_equal(a, b)  # bit for bit: parameters and Adam's moments
    # The best checkpoint too: the same step, and its parameters and moments bit for bit.
    faulted_best_step, faulted_best = _params(tmp_path / tag, "best")
    assert faulted_best_step == best_step, (tag, faulted_best_step, best_step)
    for a, b in zip(best, faulted_best, strict=True):
      np.testing.assert_array_equal(a, b)


def test_a_stuck_peer_ends_every_process_in_bounded_time(tmp_path, make_config):
  """Process 1 stops joining collectives but stays alive: process 0 ends after --stuck_timeout with
  one line naming its phase and the last checkpoint (124), and tells process 1, which ends too, with
  one line saying why (before JAX aborts it for the coordinator's loss)."""
  data_dir = make_config().data.data_dir

  def args(i, address):
    return [sys.executable, str(REPO / "tests" / "pod_stuck.py"), str(tmp_path / "w"), data_dir, address, "2",
            str(i), "15"]

  start = time.time()
  codes = _wait(_procs(args, 2, 2, tmp_path, "stuck"), timeout=300)
  errs = [_read(tmp_path / f"stuck{i}.err") for i in range(2)]
  assert codes == [124, 124], (codes, errs[0][-2000:], errs[1][-2000:])
  assert time.time() - start < 240
  line0 = [l for l in errs[0].splitlines() if l.startswith("error:")]
  assert len(line0) == 1 and "did not complete within 15 s on process 0" in line0[0], line0
  assert "after step 8" in line0[0] and "the last checkpoint is step 8" in line0[0], line0
  line1 = [l for l in errs[1].splitlines() if l.startswith("error:")]
  assert len(line1) == 1 and line1[0].startswith("error: process 0 ended the run: agreeing whether"), line1
  assert "the last checkpoint is step 8" in line1[0], line1


def test_sigterm_stops_a_two_process_evaluation_promptly(tmp_path, make_config):
  """--mode=eval has nothing to save: SIGTERM to both processes mid-evaluation ends both at once
  (143, one line each), even while they wait inside the compiled evaluation."""
  data_dir = make_config().data.data_dir
  work = tmp_path / "w"
  toy = "--config.model.features=16"  # what is checked does not depend on width
  assert _wait(_procs(_launch(work, data_dir, ("--mode=train", toy, "--config.train.steps=2",
                                                "--config.train.eval_every=2", "--config.eval.val_episodes=8")),
                      2, 2, tmp_path, "train"), 240) == [0, 0]
  procs = _procs(_launch(work, data_dir, ("--mode=eval", toy, "--config.eval.episodes=200000")), 2, 2, tmp_path, "ev")
  try:
    deadline = time.time() + 240
    while "rounded up" not in _read(tmp_path / "ev0.err"):  # set up; now loading and scoring
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.2)
    time.sleep(8)
    for p in procs:
      p.send_signal(signal.SIGTERM)
    sent = time.time()
  finally:
    codes = _wait(procs, timeout=60)
  assert codes == [143, 143], [_read(tmp_path / f"ev{i}.err")[-2000:] for i in range(2)]
  assert time.time() - sent < 15
  for i in range(2):
    last = _read(tmp_path / f"ev{i}.err").strip().splitlines()[-1]
    assert last == "stopped by SIGTERM during the test evaluation; nothing was being saved; run the same command again"


def test_malformed_cluster_flags_are_one_line(tmp_path):
  for flag, needle in (("--coordinator_address=127.0.0.1:notaport", "is not HOST:PORT"),
                       ("--coordinator_address=127.0.0.1:70000", "is not HOST:PORT"),
                       ("--coordinator_address=nohost", "is not HOST:PORT")):
    run = subprocess.run([sys.executable, str(REPO / "launch.py"), "--distributed", flag, "--num_processes=2",
                          "--process_id=0", f"--workdir={tmp_path / 'w'}"], env=_ENV, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and needle in run.stderr, (flag, run.returncode, run.stderr[-500:])
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
  run = subprocess.run([sys.executable, str(REPO / "launch.py"), "--distributed", "--num_processes=2",
                        "--coordinator_address=127.0.0.1:1234", "--process_id=5", f"--workdir={tmp_path / 'w'}"],
                       env=_ENV, cwd=str(REPO), capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and "--process_id=5 must lie in [0, --num_processes=2)" in run.stderr, run.stderr
  for flag, needle in (("--stuck_timeout=-1", "--stuck_timeout=-1.0 must be >= 0 seconds (0: never)"),
                       ("--peer_timeout=2", "--peer_timeout=2.0 must be >= 10 seconds")):
    run = subprocess.run([sys.executable, str(REPO / "launch.py"), flag, f"--workdir={tmp_path / 'w'}"],
                         env=_ENV, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
