"""Nothing lost: the workdir lock, falling back past an unreadable checkpoint, stray half-written
checkpoints, a changed config on resume, and a diverging loss."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fewshot_jax import train
from fewshot_jax.errors import ConfigError, TrainingDiverged
from tests.conftest import REPO


class Crash(Exception):
  pass


def _small(make_config, **overrides):
  return make_config("protonet", "synthetic", **{
      "episode.train_ways": 5, "train.steps": 8, "train.eval_every": 8, "train.log_every": 2,
      "train.checkpoint_every": 2, "train.steps_per_call": 2, "train.keep_checkpoints": 3,
      "eval.val_episodes": 8, "eval.episodes": 8, **overrides})


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.model_state, state.opt_state))]


def _crash_at(at):
  def hook(step, state):
    del state
    if step == at:
      raise Crash()
  return hook


def test_locked_workdir_refuses_a_second_run_and_a_stale_lock_is_taken_over(make_config, tmp_path):
  config = _small(make_config)
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-02 08:00:00"}
  (workdir / "lock").write_text(json.dumps(holder))  # held by this (live) test process
  env = dict(os.environ, TFDS_DATA_DIR=config.data.data_dir)
  run = subprocess.run([sys.executable, "launch.py", "--mode=train", f"--workdir={workdir}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  errors = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert f"in use by PID {os.getpid()} on host {holder['host']}" in errors[0]
  assert not (workdir / "checkpoints").exists()
  # A lock whose process is gone (killed) is taken over; the run releases it at the end.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "lock").write_text(json.dumps({**holder, "pid": dead.pid}))
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 8 and not (workdir / "lock").exists()
  # Released on a crash too.
  with pytest.raises(Crash):
    train.train_and_evaluate(_small(make_config, **{"train.steps": 12}), str(workdir), hooks=[_crash_at(10)])
  assert not (workdir / "lock").exists()


def test_unreadable_latest_checkpoint_falls_back_and_stray_tmp_is_removed(make_config, tmp_path):
  config = _small(make_config)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  crashy = tmp_path / "crashy"
  with pytest.raises(Crash):
    train.train_and_evaluate(config, str(crashy), hooks=[_crash_at(6)])
  ckpts = crashy / "checkpoints"
  assert sorted(int(p) for p in os.listdir(ckpts)) == [2, 4, 6]
  shutil.rmtree(ckpts / "6" / "state")  # the newest step lost its arrays (a killed writer, a bad disk)
  stray = ckpts / "7.orbax-checkpoint-tmp-1234"
  stray.mkdir()
  (stray / "junk").write_text("x")
  resumed = train.train_and_evaluate(config, str(crashy))
  assert not stray.exists()
  assert int(resumed.step) == 8
  for a, b in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)  # resumed from step 4, still bit-identical


def test_changed_config_on_resume_is_refused_unless_allowed(make_config, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_small(make_config), workdir)
  with pytest.raises(ConfigError) as err:
    train.train_and_evaluate(_small(make_config, **{"episode.train_ways": 10, "train.steps": 10}), workdir)
  assert "episode.train_ways: 5 -> 10" in str(err.value) and "train.steps" not in str(err.value)
  assert "allow_config_change" in str(err.value)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["episode"]["train_ways"] == 5  # untouched
  # Run length alone may change; the change is recorded.
  state = train.train_and_evaluate(_small(make_config, **{"train.steps": 10}), workdir)
  assert int(state.step) == 10
  state = train.train_and_evaluate(_small(make_config, **{"episode.train_ways": 10, "train.steps": 12,
                                                          "train.allow_config_change": True}), workdir)
  assert int(state.step) == 12
  with open(tmp_path / "config_history.jsonl") as f:
    history = [json.loads(l) for l in f]
  assert [h["changed"] for h in history] == [[], ["episode.train_ways: 5 -> 10"]]
  assert history[1]["previous"]["train"]["steps"] == 10
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["episode"]["train_ways"] == 10


def test_diverging_loss_stops_with_the_last_good_checkpoint_or_skips(make_config, tmp_path):
  config = _small(make_config, **{"train.lr": 1e35, "train.steps": 8})
  with pytest.raises(TrainingDiverged) as err:
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  message = str(err.value)
  assert "non-finite between steps" in message and "train.lr=1e+35" in message
  assert "train.nonfinite='skip'" in message
  good = [int(p) for p in os.listdir(tmp_path / "stop" / "checkpoints")]
  assert (f"checkpoint is step {max(good)}" in message) if good else ("no checkpoint was written" in message)
  state = train.train_and_evaluate(_small(make_config, **{"train.lr": 1e35, "train.nonfinite": "skip"}),
                                   str(tmp_path / "skip"))
  assert int(state.step) == 8
  assert all(np.isfinite(x).all() for x in _leaves(state))


def test_atomic_writes_leave_no_temporary_file_and_keep_the_old_one_on_error(tmp_path):
  from fewshot_jax import files  # pylint: disable=g-import-not-at-top
  path = tmp_path / "result.json"
  files.write_atomic(str(path), "first")
  umask = os.umask(0)
  os.umask(umask)
  assert path.read_text() == "first" and (path.stat().st_mode & 0o777) == 0o666 & ~umask
  with pytest.raises(RuntimeError):
    with files.atomic_path(str(path)) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "first" and os.listdir(tmp_path) == ["result.json"]


def test_evaluation_beside_a_running_training_reads_the_newest_committed_checkpoint(make_config, tmp_path):
  """A workdir as a live training leaves it: locked, with a step being written. Evaluation takes no
  lock, reads the newest committed step and removes nothing."""
  from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = _small(make_config)
  train.train_and_evaluate(config, str(tmp_path))
  lock = tmp_path / "lock"
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
  writing = tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-99"
  writing.mkdir()
  config.eval.checkpoint = "latest"
  result = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert result["step"] == 8 and result["checkpoint"] == "latest"
  assert writing.exists() and lock.exists()
