"""Prediction throughput (query images/s) of fewshot_jax.load's Model and of --mode=predict's file path.

For each case (method:preset), a workdir holding the model at its random initialisation (untrained
weights: speed does not depend on them) is written to a temporary folder and loaded with
fewshot_jax.load; then, for a 5-way 5-shot support set and --queries query images:
  * device: Model.predict_batches on images already as the dataset stores them (the on-device
    normalisation / resize and the network only);
  * arrays: Model.predict on uint8 arrays at twice the stored size (host resize with the dataset's
    resampling, then the device);
  * files: predict.run on JPEG files at twice the stored size, the --mode=predict path (PIL decode +
    resize, JSON lines written to /dev/null).
Each is timed after one warm-up call (whose time, mostly XLA compilation, is the `first call` column),
the best of --repeats. Prints a markdown table.

  python benchmarks/predict_throughput.py
  python benchmarks/predict_throughput.py --cases=protonet:omniglot-5w1s --queries=256 --batch=64
"""

import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()  # as launch.py: before JAX creates its backend

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from PIL import Image

import fewshot_jax
from fewshot_jax import checkpoint
from fewshot_jax import config as config_lib
from fewshot_jax import methods
from fewshot_jax import predict
from fewshot_jax import state as state_lib

flags.DEFINE_list("cases", ["protonet:omniglot-5w1s", "protonet:mini-5w1s"], "method:preset, comma separated.")
flags.DEFINE_integer("queries", 512, "Query images per timed call.")
flags.DEFINE_integer("batch", 128, "Query images per compiled call (--predict_batch).")
flags.DEFINE_integer("repeats", 3, "Timed calls after the warm-up; the best is reported.")
FLAGS = flags.FLAGS

WAYS, SHOTS = 5, 5


def untrained_workdir(method_name: str, preset: str, path: str) -> str:
  config = config_lib.load_file(os.path.join(REPO, "configs", f"{method_name}.py"), preset)
  method = methods.build(config)
  example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_lib.train_example(method, config))
  variables = method.init(jax.random.key(0), example)
  params = variables.pop("params")
  tx = state_lib.optimizer_for(method, config)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                               opt_state=tx.init(params))
  ckpt = checkpoint.Checkpoints(path, 1)
  ckpt.save(ckpt.best, state, checkpoint.checkpoint_meta(config), metrics={"val_accuracy": 0.0})
  ckpt.wait()
  ckpt.close()
  checkpoint.write_config(path, config)
  return path


def smooth_images(n: int, size: int, channels: int, seed: int) -> np.ndarray:
  """uint8 [n, size, size, C]: random 8x8 patterns upsampled (photo-like JPEG sizes, unlike noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8)
  mode = "L" if channels == 1 else "RGB"
  return np.stack([np.asarray(Image.fromarray(s.squeeze(-1) if channels == 1 else s, mode).resize(
      (size, size), Image.Resampling.BILINEAR)).reshape(size, size, channels) for s in small])


def best_time(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, best of `repeats` later calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, min(times)


def time_case(case: str, root: str) -> list[dict]:
  method_name, preset = case.split(":")
  model = fewshot_jax.load(untrained_workdir(method_name, preset, os.path.join(root, preset)))
  s, c, q = model.image_size, model.channels, FLAGS.queries
  labels = np.repeat(np.arange(WAYS), SHOTS)
  support = model.prepare(smooth_images(WAYS * SHOTS, s, c, 0))
  stored = model.prepare(smooth_images(q, s, c, 1))
  big = smooth_images(q, 2 * s, c, 2)
  folder = os.path.join(root, f"{preset}-files")
  for k in range(WAYS):
    os.makedirs(os.path.join(folder, "support", f"class{k}"))
    for i in range(SHOTS):
      Image.fromarray(big[k * SHOTS + i].squeeze()).save(os.path.join(folder, "support", f"class{k}", f"{i}.jpg"))
  os.makedirs(os.path.join(folder, "query"))
  for i, image in enumerate(big):
    Image.fromarray(image.squeeze()).save(os.path.join(folder, "query", f"{i:05d}.jpg"), quality=90)
  inputs = predict.Inputs.list(os.path.join(folder, "support"), os.path.join(folder, "query"))
  batch = min(FLAGS.batch, q)

  def device():
    chunks = (stored[i:i + batch] for i in range(0, q, batch))
    for _ in model.predict_batches(support, labels, chunks, batch_size=batch):
      pass

  def files():
    with open(os.devnull, "w") as null:
      predict.run(model, inputs, batch_size=batch, progress=False, stdout=null, stderr=null)

  rows = []
  for path, fn in (("device", device), ("arrays", lambda: model.predict(support, labels, big, batch_size=batch)),
                   ("files", files)):
    first, best = best_time(fn, FLAGS.repeats)
    rows.append({"case": f"{method_name} {preset} ({s}x{s}x{c}, {model.config.model.backbone})", "path": path,
                 "first": first, "images_per_s": q / best, "ms_per_image": 1000 * best / q})
  return rows


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as root:
    rows = [r for case in FLAGS.cases for r in time_case(case, root)]
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} device(s), {os.cpu_count()} CPU(s) "
        f"({platform.machine()}), {WAYS}-way {SHOTS}-shot supports, {FLAGS.queries} queries in batches of "
        f"{FLAGS.batch}, untrained weights, best of {FLAGS.repeats}\n")
  print("| model | path | first call (s) | images/s | ms/image |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['case']} | {r['path']} | {r['first']:.1f} | {r['images_per_s']:.0f} | {r['ms_per_image']:.2f} |")


if __name__ == "__main__":
  app.run(main)
