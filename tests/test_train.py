"""Trainer: chunking, exact resume after a crash, 1 vs 8 devices, a short real Omniglot run."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fewshot_jax import evaluate
from fewshot_jax import train
from tests.conftest import REPO


class Preempted(Exception):
  pass


def test_call_lengths_stop_at_boundaries():
  assert train.call_lengths(0, 10, 4, (5,)) == [4, 1, 3, 2]
  assert train.call_lengths(5, 10, 4, (5,)) == [3, 2]  # resuming at 5 repeats the same tail
  assert sum(train.call_lengths(7, 100, 25, (10, 50))) == 93


def _small(make_config, **overrides):
  return make_config("protonet", "synthetic", **{
      "train.steps": 8, "train.eval_every": 4, "train.log_every": 2, "train.steps_per_call": 2,
      "eval.val_episodes": 16, "eval.episodes": 16, **overrides})


def test_interrupted_run_resumes_to_identical_parameters(make_config, tmp_path):
  config = _small(make_config)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))

  def crash_after_first_checkpoint(step, state):
    if step == 6:  # checkpoint at 4 exists; steps 5-6 are lost with the crash
      raise Preempted()

  with pytest.raises(Preempted):
    train.train_and_evaluate(config, str(tmp_path / "crashy"), hooks=[crash_after_first_checkpoint])
  resumed = train.train_and_evaluate(config, str(tmp_path / "crashy"))
  assert int(resumed.step) == int(full.step) == 8
  for a, b in zip(jax.tree.leaves((full.params, full.model_state, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.model_state, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Latest and best checkpoints and TensorBoard events are in the workdir.
  assert os.listdir(tmp_path / "crashy" / "checkpoints") and os.listdir(tmp_path / "crashy" / "best")
  assert glob.glob(str(tmp_path / "crashy" / "tb" / "events.out.tfevents.*"))


def test_python_loop_and_scan_train_alike(make_config):
  """train.loop='python' (the CPU default with XLA convolutions) runs the scan's steps: same keys,
  same updates, metrics averaged over the call. SGD at a small lr, as the probe below: XLA computes
  a convolution differently inside and outside a loop body, and Adam amplifies that rounding."""
  from fewshot_jax import methods, sharding, state as state_lib  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import episodes, input_pipeline  # pylint: disable=g-import-not-at-top
  results = {}
  for loop in ("scan", "python"):
    c = _small(make_config, **{"train.loop": loop, "train.optimizer": "sgd", "train.lr": 1e-3})
    mesh = sharding.make_mesh()
    method, tx = methods.build(c), state_lib.make_optimizer(c)
    data = input_pipeline.load(c, "train", mesh)
    example = episodes.episode_shapes(5, 1, 5, 1, (28, 28, 1))
    st = jax.jit(lambda k, m=method, t=tx: state_lib.init_state(m, t, k, example))(jax.random.key(0))
    fn = train.make_train_fn(method, tx, c, mesh)
    # Two calls of one length: the scan compiles once (each length is a compilation).
    st, m0 = fn(st, data, jax.random.key(1), 2)
    st, m1 = fn(st, data, jax.random.key(1), 2)
    results[loop] = (int(st.step), [float(m["loss"]) for m in (m0, m1)], jax.tree.leaves(st.params))
  scan, python = results["scan"], results["python"]
  assert scan[0] == python[0] == 4
  np.testing.assert_allclose(python[1][0], scan[1][0], rtol=1e-5)  # the same first two steps
  np.testing.assert_allclose(python[1], scan[1], rtol=1e-4)
  assert len(set(python[1])) == 2  # different episodes per call (the key folds in the step)
  for a, b in zip(python[2], scan[2]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert train.train_loop(_small(make_config, **{"train.loop": "auto"})) in ("python", "scan")


_PROBE = r"""
import json, sys, jax, numpy as np
sys.path.insert(0, {repo!r})
from tests.conftest import load_config
from fewshot_jax import methods, sharding, state as state_lib, train
from fewshot_jax.data import episodes, input_pipeline
c = load_config("protonet", "synthetic")
c.data.data_dir = {data_dir!r}
c.episode.tasks = 8
# SGD at a small lr: Adam's first steps (~lr * sign(g)) and large steps amplify float-rounding
# differences of the sharded reductions ~10x per step (measured), hiding real mismatches.
c.train.optimizer, c.train.lr = "sgd", 1e-3
mesh = sharding.make_mesh()
method, tx = methods.build(c), state_lib.make_optimizer(c)
data = input_pipeline.load(c, "train", mesh)
example = episodes.episode_shapes(20, 1, 5, 8, (28, 28, 1))
st = jax.jit(lambda k: state_lib.init_state(method, tx, k, example), out_shardings=sharding.replicated(mesh))(jax.random.key(0))
fn = train.make_train_fn(method, tx, c, mesh)
losses = []
for _ in range(3):
  st, m = fn(st, data, jax.random.key(1), 2)
  losses.append(float(m["loss"]))
print(json.dumps({{"devices": len(jax.devices()), "losses": losses,
                  "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(st.params)]}}))
"""


def _run_probe(devices, data_dir):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE.format(repo=str(REPO), data_dir=data_dir)],
                       env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_loss_on_one_and_eight_devices(make_config):
  """Episodes sharded over 8 devices (params replicated) train exactly like one device."""
  data_dir = make_config().data.data_dir
  one, eight = _run_probe(1, data_dir), _run_probe(8, data_dir)
  assert (one["devices"], eight["devices"]) == (1, 8)
  # Step 1 is the same computation; later steps differ only by float reduction order.
  np.testing.assert_allclose(eight["losses"][0], one["losses"][0], rtol=1e-6)
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=5e-5)
  # Whole parameter vector: per leaf, conv biases before BatchNorm have zero true
  # gradient and hold only rounding noise.
  a, b = np.concatenate(eight["params"]), np.concatenate(one["params"])
  assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)  # measured: 1.5e-5


@pytest.mark.slow
def test_short_omniglot_run_learns(make_config, tmp_path):
  """150 x 20-way episodes of real Omniglot lift 5-way 1-shot test accuracy far above chance (20%)."""
  config = make_config("protonet", "omniglot-5w1s", **{
      "episode.train_ways": 20, "train.steps": 150, "train.eval_every": 150, "train.log_every": 50,
      "eval.val_episodes": 100, "eval.episodes": 200})
  train.train_and_evaluate(config, str(tmp_path))
  result = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert result["accuracy"] > 85.0, result
  with open(tmp_path / "eval_test.json") as f:
    written = json.load(f)
  assert written == {"standard/5w1s/75q/best": result}
  assert set(result) == {"method", "dataset", "split", "eval_data", "ways", "shots", "protocol",
                         "queries_per_episode", "episodes", "accuracy", "ci95", "mode", "modes", "step", "checkpoint"}
  assert result["eval_data"] == "omniglot:test"
  # Another task evaluated on the same checkpoint is added beside it.
  config.episode.ways = 20
  twenty = evaluate.evaluate_checkpoint(config, str(tmp_path))
  with open(tmp_path / "eval_test.json") as f:
    assert json.load(f) == {"standard/5w1s/75q/best": result, "standard/20w1s/300q/best": twenty}
  assert (result["ways"], result["shots"], result["queries_per_episode"], result["episodes"]) == (5, 1, 75, 200)
  assert result["modes"] == {"default": {k: result[k] for k in ("accuracy", "ci95", "episodes")}}
  assert 0 < result["ci95"] < 5


def test_short_matchingnet_run_learns(make_config, tmp_path):
  """MatchingNet trains with the same trainer: synthetic 5-way 1-shot val accuracy far above 20%."""
  config = make_config("matchingnet", "synthetic", **{
      "train.steps": 100, "train.eval_every": 100, "train.log_every": 50, "eval.val_episodes": 96,
      "eval.episodes": 96})
  train.train_and_evaluate(config, str(tmp_path))
  result = evaluate.evaluate_checkpoint(config, str(tmp_path))
  assert result["method"] == "matchingnet" and result["accuracy"] > 60.0, result
