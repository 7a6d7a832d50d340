"""Workdirs written before this code still evaluate and resume: a tiny ProtoNet workdir written by
commit afccc2d (Conv-4 of width 8, 4 steps on `synthetic`, checked in under tests/fixtures)."""

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from fewshot_jax import evaluate
from fewshot_jax import train

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "workdir_afccc2d"


def _config(make_config, **train_keys):
  return make_config("protonet", "synthetic", **{"model.features": 8, "train.steps": 4, "train.eval_every": 2,
                                                 "train.checkpoint_every": 2, "train.keep_checkpoints": 1,
                                                 "eval.val_episodes": 16, "eval.episodes": 32, **train_keys})


def test_a_workdir_of_the_previous_code_evaluates_and_resumes(tmp_path, make_config, monkeypatch, caplog):
  """Evaluation scores the old best checkpoint as the old code did; training on to step 6 resumes from
  the old latest checkpoint (step 4): it says so, runs only steps 5-6, and starts from exactly the
  parameters and optimiser state stored there (read here with orbax alone, not through the code under
  test). A workdir the code no longer recognised would train from step 0 with fresh parameters."""
  work = tmp_path / "w"
  shutil.copytree(FIXTURE, work)
  written = json.loads((FIXTURE / "eval_test.json").read_text())["standard/5w1s/75q/best"]
  result = evaluate.evaluate_checkpoint(_config(make_config), str(work))
  # ProtoNet draws no prediction noise: the same checkpoint scores the same episodes alike.
  assert (result["step"], result["episodes"]) == (written["step"], written["episodes"]) == (2, 32)  # best of 2, 4

  assert result["accuracy"] == written["accuracy"]
  calls = []  # (state the call started from, its length), for every host call of training
  make_train_fn = train.make_train_fn

  def recording_make_train_fn(*args, **kwargs):
    train_fn = make_train_fn(*args, **kwargs)

    def recording(state, data, key, length):
      calls.append((jax.device_get(state), length))
      return train_fn(state, data, key, length)

    return recording

  monkeypatch.setattr(train, "make_train_fn", recording_make_train_fn)
  caplog.set_level(logging.INFO, logger="absl")
  state = train.train_and_evaluate(_config(make_config, **{"train.steps": 6}), str(work))
  assert int(state.step) == 6
  assert any(r.getMessage() == f"Resumed from {work / 'checkpoints'} at step 4" for r in caplog.records), \
      [r.getMessage() for r in caplog.records if "esum" in r.getMessage()]
  assert int(calls[0][0].step) == 4 and sum(length for _, length in calls) == 2  # steps 5 and 6 only
  stored = ocp.StandardCheckpointer().restore(str(FIXTURE / "checkpoints" / "4" / "state"))
  assert int(stored["step"]) == 4
  for part in ("params", "model_state", "opt_state"):
    got = jax.tree.leaves(getattr(calls[0][0], part))
    want = jax.tree.leaves(stored[part])
    assert len(got) == len(want) > 0 and all(np.array_equal(g, w) for g, w in zip(got, want)), part
