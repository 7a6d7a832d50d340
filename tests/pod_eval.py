"""Scores every method's every prediction mode on the same episodes, in one process or several.

Run by tests/test_pods.py: `python tests/pod_eval.py OUT.json DATA_DIR EPISODES TASKS [COORDINATOR NPROC ID]`
(EPISODES: method=count,... for the methods to score; TASKS: comma-separated eval.tasks values). Toy-width models with fixed random weights (the same
on every process: initialised from one key): ProtoNet, MatchingNet and LGM-Net on `synthetic`,
IDeMe-Net stage 2 on generated 32-pixel RGB classes with a gallery embedded by its random E.
Process 0 writes {case: {tasks: {mode: [per-episode accuracy]}}}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()

def _cases(data_dir):
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  cases = {}
  for method in ("protonet", "matchingnet", "lgmnet"):
    c = load_config(method, "synthetic")
    c.data.data_dir = data_dir
    c.model.features = 16
    cases[method] = c
  c = load_config("idemenet", "mini-5w1s")
  c.data.update(image_size=32, input_size=32)
  c.method.update(num_classes=8, gallery_per_class=3, choose_num=4, augnum=2)
  c.episode.queries = 2
  c.eval.queries = 2
  cases["idemenet"] = c
  return cases


def _toy_rgb(mesh):
  """8 classes x 10 images of 32 x 32 RGB (a fixed pattern per class + noise), replicated on the mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import episodes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  protos = rng.integers(0, 256, (8, 1, 32, 32, 3))
  images = np.clip(protos + rng.integers(-50, 50, (8, 10, 32, 32, 3)), 0, 255).astype(np.uint8).reshape(-1, 32, 32, 3)
  labels = np.repeat(np.arange(8), 10)
  host = episodes.from_arrays(images, labels)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  put = lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: np.asarray(x)[i])
  return host.replace(images=put(host.images), class_index=put(host.class_index),
                      class_counts=put(host.class_counts), class_ids=put(host.class_ids), mesh=mesh), images


def _variables(method, config, mesh, dataset, images):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
  from fewshot_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  example = state_lib.train_example(method, config)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
  variables = jax.jit(method.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0), zeros)
  variables = jax.device_get(variables)
  if config.method.name == "idemenet":  # the gallery setup() would embed from stage 1's E
    from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
    idx, labels = idemenet.choose_gallery(np.asarray(jax.device_get(dataset.class_index)),
                                          np.asarray(jax.device_get(dataset.class_counts)),
                                          config.method.gallery_per_class, 0)
    e_vars = {"params": variables["params"]["embedding"], "batch_stats": variables["batch_stats"]["embedding"]}
    feats = idemenet.embed_batched(idemenet.embedding_model(config), e_vars, jnp.asarray(images[idx]), config)
    variables["gallery"] = {"images": images[idx], "labels": labels, "features": np.asarray(feats)}
  variables = jax.device_put(variables, sharding.replicated(mesh))
  return variables.pop("params"), variables


def score(config, mesh, runs) -> dict:
  """{tasks: {mode: per-episode accuracies}} of one case (its toy model) for each (eval.tasks, episodes)
  of `runs`, all on the same episodes (episode i keyed by its index)."""
  from fewshot_jax import evaluate, methods  # pylint: disable=g-import-not-at-top
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  method = methods.build(config)
  if config.method.name == "idemenet":
    dataset, images = _toy_rgb(mesh)
  else:
    dataset, images = input_pipeline.load(config, "test", mesh), None
  params, state = _variables(method, config, mesh, dataset, images)
  scores = {}
  for tasks, num in runs:
    config.eval.tasks = tasks
    scores[tasks] = evaluate.Evaluator(method, config, mesh, "test", num, dataset=dataset).per_episode(params, state)
  return scores


def main(argv):
  out, data_dir, tasks = argv[1], argv[2], [int(t) for t in argv[4].split(",")]
  counts = {k: int(v) for k, v in (item.split("=") for item in argv[3].split(","))}
  if len(argv) > 5:
    from fewshot_jax import multihost  # pylint: disable=g-import-not-at-top
    multihost.initialize(argv[5], int(argv[6]), int(argv[7]))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fewshot_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  result, seconds = {}, {}
  for name, config in _cases(data_dir).items():
    if name not in counts:
      continue
    start = time.time()
    scores = score(config, mesh, [(t, counts[name]) for t in tasks])
    result[name] = {str(t): {m: np.asarray(a, np.float64).tolist() for m, a in per_mode.items()}
                    for t, per_mode in scores.items()}
    seconds[name] = time.time() - start
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"devices": mesh.size, "processes": jax.process_count(), "result": result,
                 "seconds": seconds}, f)


if __name__ == "__main__":
  main(sys.argv)
