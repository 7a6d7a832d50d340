"""Workdirs written before this code still evaluate and resume: a tiny ProtoNet workdir written by
commit afccc2d (Conv-4 of width 8, 4 steps on `synthetic`, checked in under tests/fixtures)."""

import json
import pathlib
import shutil

from fewshot_jax import evaluate
from fewshot_jax import train

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "workdir_afccc2d"


def _config(make_config, **train_keys):
  return make_config("protonet", "synthetic", **{"model.features": 8, "train.steps": 4, "train.eval_every": 2,
                                                 "train.checkpoint_every": 2, "train.keep_checkpoints": 1,
                                                 "eval.val_episodes": 16, "eval.episodes": 32, **train_keys})


def test_a_workdir_of_the_previous_code_evaluates_and_resumes(tmp_path, make_config):
  work = tmp_path / "w"
  shutil.copytree(FIXTURE, work)
  written = json.loads((FIXTURE / "eval_test.json").read_text())["standard/5w1s/75q/best"]
  result = evaluate.evaluate_checkpoint(_config(make_config), str(work))
  # ProtoNet draws no prediction noise: the same checkpoint scores the same episodes alike.
  assert (result["step"], result["episodes"]) == (written["step"], written["episodes"]) == (2, 32)  # best of 2, 4
  assert result["accuracy"] == written["accuracy"]
  state = train.train_and_evaluate(_config(make_config, **{"train.steps": 6}), str(work))
  assert int(state.step) == 6
