"""--mode=predict and fewshot_jax.load: users' image files through a trained workdir's model.

Workdirs: ProtoNet trained for a few steps on the synthetic preset; LGM-Net (toy width) and IDeMe-Net
(tests/test_idemenet.py's 32x32 toy) saved at their random initialisation. The key check: evaluation
episode 0's images written as PNG files (exact uint8) and predicted from the files give the labels
the evaluator's own JAX predictions of that episode give, in every mode.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fewshot_jax
from fewshot_jax import api
from fewshot_jax import checkpoint
from fewshot_jax import evaluate
from fewshot_jax import methods
from fewshot_jax import predict
from fewshot_jax import sharding
from fewshot_jax import state as state_lib
from fewshot_jax import train
from fewshot_jax.data import input_pipeline
from fewshot_jax.data import omniglot
from fewshot_jax.data import registry
from fewshot_jax.errors import CheckpointError, ConfigError, DataError
from fewshot_jax.methods import idemenet
from tests.conftest import REPO, load_config


def launch(*args, timeout=240) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ))


def user_error(result, *needles) -> str:
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  report = f"exit {result.returncode}, stderr:\n{result.stderr[-4000:]}"
  assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, report
  for needle in needles:
    assert str(needle) in lines[0], (needle, lines[0])
  return lines[0]


def save_workdir(config, path, params=None, model_state=None, seed=0) -> str:
  """A workdir holding config.json and a best checkpoint of the given (or freshly initialised) variables."""
  method = methods.build(config)
  if params is None:
    example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_lib.train_example(method, config))
    variables = method.init(jax.random.key(seed), example)
    params = variables.pop("params")
    model_state = variables
  tx = state_lib.optimizer_for(method, config)
  ts = state_lib.TrainState(step=jnp.asarray(5, jnp.int32), params=params, model_state=model_state,
                            opt_state=tx.init(params))
  ckpt = checkpoint.Checkpoints(str(path), 1)
  ckpt.save(ckpt.best, ts, checkpoint.checkpoint_meta(config), metrics={"val_accuracy": 0.5})
  ckpt.wait()
  ckpt.close()
  checkpoint.write_config(str(path), config)
  return str(path)


def episode_zero(model, dataset, accuracy: bool = False):
  """Evaluation episode 0 of model.config under the standard protocol: (uint8 support, support labels,
  uint8 query, query labels) of its images as the dataset stores them, {mode: JAX scores [Q, N]} of the
  evaluator's own sampling of that episode predicted by Method.modes with the evaluator's keys (eval.tasks
  episodes, task 0) and, with `accuracy`, the evaluator's per-episode accuracy of episode 0."""
  config = model.config
  sample_key, predict_key = evaluate.episode_keys(config)
  sampling = dict(evaluate.standard_sampling(config), augment=None)  # floats = uint8 / 255
  raw = jax.jit(lambda d: evaluate.sample_batch(sample_key, d, 0, 1, **sampling))(dataset)
  to_u8 = lambda x: np.asarray(jnp.round(x[0] * 255)).astype(np.uint8)
  evaluator = evaluate.Evaluator(model.method, config, sharding.make_mesh(), "test", config.eval.tasks,
                                 dataset=dataset, protocol="standard")
  episode = evaluator.sample(dataset, 0)
  keys = evaluate.indexed_keys(predict_key, 0, config.eval.tasks)
  scores = jax.jit(model.method.modes)(model.params, model.model_state, episode, keys)
  per_episode = evaluator.per_episode(model.params, model.model_state) if accuracy else {}
  return dict(support=to_u8(raw.support), support_labels=np.asarray(raw.support_labels[0]),
              query=to_u8(raw.query), query_labels=np.asarray(raw.query_labels[0]), episode=episode,
              scores={m: np.asarray(s[0]) for m, s in scores.items()},
              accuracy={m: float(a[0]) for m, a in per_episode.items()})


def write_task(root, support, labels, query, fmt="png"):
  """support/class_<label>/<i>.png and query/q<i>.png; returns (support dir, query dir, query paths)."""
  squeeze = lambda x: x[:, :, 0] if x.shape[-1] == 1 else x
  for i, (image, label) in enumerate(zip(support, labels)):
    os.makedirs(root / "support" / f"class_{label}", exist_ok=True)
    Image.fromarray(squeeze(image)).save(root / "support" / f"class_{label}" / f"{i:03d}.{fmt}")
  os.makedirs(root / "query", exist_ok=True)
  paths = []
  for i, image in enumerate(query):
    paths.append(str(root / "query" / f"q{i:03d}.{fmt}"))
    Image.fromarray(squeeze(image)).save(paths[-1])
  return str(root / "support"), str(root / "query"), paths


def listed_support(support_dir):
  """(paths, labels) of a support folder as --mode=predict lists it."""
  inputs = predict.Inputs.list(support_dir, support_dir + "/..")  # (any existing query spec)
  return ([p for paths in inputs.class_paths for p in paths],
          np.array([i for i, paths in enumerate(inputs.class_paths) for _ in paths]))


def read_lines(text: str) -> list[dict]:
  return [json.loads(l) for l in text.splitlines() if l.strip()]


# ---------------------------------------------------------------- workdirs


@pytest.fixture(scope="module")
def proto(prepared_dir, tmp_path_factory):
  """(workdir, model) of ProtoNet trained 10 steps on the synthetic preset (20-way training episodes)."""
  config = load_config("protonet", "synthetic")
  config.data.data_dir = prepared_dir
  config.train.update(steps=10, eval_every=10, log_every=10, steps_per_call=10, checkpoint_every=10)
  config.eval.update(val_episodes=4, tasks=2, queries=3)
  workdir = str(tmp_path_factory.mktemp("predict") / "protonet")
  train.train_and_evaluate(config, workdir)
  return workdir, fewshot_jax.load(workdir)


@pytest.fixture(scope="module")
def synthetic_test(proto):
  return input_pipeline.load(proto[1].config, "test")


# ---------------------------------------------------------------- agreement with evaluation


def test_cli_on_episode_files_agrees_with_evaluation_and_the_api(proto, synthetic_test, tmp_path):
  workdir, model = proto
  ep = episode_zero(model, synthetic_test, accuracy=True)
  support_dir, query_dir, paths = write_task(tmp_path, ep["support"], ep["support_labels"], ep["query"])
  out = tmp_path / "pred.jsonl"
  result = launch("--mode=predict", f"--workdir={workdir}", f"--support={support_dir}", f"--query={query_dir}",
                  f"--out={out}", "--predict_batch=4")  # 15 queries: 4 batches, the last padded
  assert result.returncode == 0, result.stderr[-3000:]
  lines = read_lines(out.read_text())
  assert [l["path"] for l in lines] == paths
  got = np.array([int(l["label"].split("_")[1]) for l in lines])
  want = ep["scores"]["default"].argmax(-1)
  np.testing.assert_array_equal(got, want)
  assert np.mean(got == ep["query_labels"]) == pytest.approx(ep["accuracy"]["default"])
  probs = np.array([[l["probabilities"][f"class_{c}"] for c in range(5)] for l in lines])
  np.testing.assert_allclose(probs, jax.nn.softmax(ep["scores"]["default"]), atol=2e-5)
  summary = [json.loads(l) for l in result.stderr.splitlines() if l.startswith('{"summary"')]
  assert summary and summary[0]["summary"]["queries"] == 15 and summary[0]["summary"]["ways"] == 5
  # The Python API on the same files: the CLI's numbers; on the evaluator's preprocessed floats: its labels.
  support_paths, support_labels = listed_support(support_dir)
  labels, api_probs = model.predict(model.read_images(support_paths), support_labels, model.read_images(paths))
  np.testing.assert_array_equal(labels, got)
  np.testing.assert_allclose(api_probs, probs, atol=1e-6)
  float_labels, _ = model.predict(np.asarray(ep["episode"].support[0]), ep["support_labels"],
                                  np.asarray(ep["episode"].query[0]))
  np.testing.assert_array_equal(float_labels, want)


def test_other_way_and_shot_counts_and_unequal_classes(proto, synthetic_test):
  model = proto[1]
  images = np.asarray(synthetic_test.images)
  index = np.asarray(synthetic_test.class_index)
  for ways, shots in ((3, 1), (10, 2)):
    support = np.concatenate([images[index[c, :shots]] for c in range(ways)])
    query = np.concatenate([images[index[c, 10:13]] for c in range(ways)])
    labels, probs = model.predict(support, np.repeat(np.arange(ways), shots), query)
    assert labels.shape == (3 * ways,) and probs.shape == (3 * ways, ways)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(labels == np.repeat(np.arange(ways), 3)) > 1.5 / ways  # better than chance
  # Unequal shots: 1, 3 and 2 supports.
  counts = (1, 3, 2)
  support = np.concatenate([images[index[c, :k]] for c, k in enumerate(counts)])
  labels, probs = model.predict(support, np.repeat(np.arange(3), counts), images[index[0, 10:12]])
  assert probs.shape == (2, 3)


def test_one_compilation_per_shape(proto):
  model = fewshot_jax.load(proto[0])  # a fresh model: its own jitted functions
  rng = np.random.default_rng(0)
  images = lambda n, size=28: rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  model.predict(images(5), np.arange(5), images(10), batch_size=8)
  assert model.traces["predict"] == 1
  model.predict(images(5, 40), np.arange(5), images(16, 33), batch_size=8)  # other pixels and sizes, same batches
  assert model.traces["predict"] == 1
  model.predict(images(6), np.arange(6) % 3, images(8), batch_size=8)  # 3-way: a new shape
  assert model.traces["predict"] == 2
  model.embed(images(4), batch_size=4)
  model.embed(images(4), batch_size=4)
  assert model.traces["embed"] == 1
  assert model.embed(images(3)).shape == (3, 64)  # Conv-4's features of a 28x28 image


# ---------------------------------------------------------------- images


def test_image_files_of_any_format_size_and_mode(proto, tmp_path):
  model = proto[1]
  rng = np.random.default_rng(1)
  glyph = rng.integers(0, 256, (28, 28), dtype=np.uint8)
  big = rng.integers(0, 256, (70, 50), dtype=np.uint8)
  Image.fromarray(glyph).save(tmp_path / "grey.png")
  Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
  Image.fromarray(np.stack([glyph] * 3 + [np.full_like(glyph, 255)], -1)).save(tmp_path / "rgba.png")
  got = model.read_images([str(tmp_path / "grey.png")])
  np.testing.assert_array_equal(got[0, :, :, 0], glyph)  # exact at the stored size
  with Image.open(tmp_path / "big.jpg") as im:  # resized whole as the synthetic generator downsamples
    want = np.asarray(im.convert("L").resize((28, 28), Image.Resampling.BOX))
  np.testing.assert_array_equal(model.read_images([str(tmp_path / "big.jpg")])[0, :, :, 0], want)
  # A colour file for a grey model: converted by the one channel rule, as the builders convert theirs.
  converted = model.read_images([str(tmp_path / "rgba.png")])
  np.testing.assert_array_equal(converted[0, :, :, 0], glyph)
  # Arrays: the same preparation as files.
  np.testing.assert_array_equal(model.prepare([glyph, big[..., None]]), model.read_images(
      [str(tmp_path / "grey.png")]).tolist() + [np.asarray(Image.fromarray(big).resize(
          (28, 28), Image.Resampling.BOX))[..., None].tolist()])


def test_dataset_records_read_users_images_as_their_builders():
  """Each record's read_image against an independent reference (Pillow directly) on a plain RGB JPEG and
  an Omniglot scan; tests/test_image_reading.py checks every record's builder against prediction on files
  a reading can get wrong."""
  rng = np.random.default_rng(2)
  photo = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(photo).save(buffer, format="JPEG")
  data = buffer.getvalue()
  for name, resample in (("mini_imagenet", Image.Resampling.LANCZOS), ("cub", Image.Resampling.BICUBIC),
                         ("image_folder", Image.Resampling.BICUBIC)):
    with Image.open(io.BytesIO(data)) as im:
      want = np.asarray(im.convert("RGB").resize((84, 84), resample))
    np.testing.assert_array_equal(registry.get(name).read_image(data, "x", 84, 3), want, err_msg=name)
  scan = rng.random((105, 105)) < 0.2  # an Omniglot scan: ink on white paper
  image = Image.fromarray(np.where(scan, 0, 255).astype(np.uint8))
  np.testing.assert_array_equal(registry.get("omniglot").read_image(image, "scan", 28, 1)[:, :, 0],
                                omniglot.resize_ink(scan[None], 28)[0])
  for record in registry.DATASETS:
    assert record.read_image(image, "scan", 20, record.channels).shape == (20, 20, record.channels), record.name


# ---------------------------------------------------------------- bad input


def _folders(root, classes=(("a", 2), ("b", 2)), queries=3):
  rng = np.random.default_rng(3)
  for name, count in classes:
    os.makedirs(root / "support" / name, exist_ok=True)
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "support" / name / f"{i}.png")
  os.makedirs(root / "query", exist_ok=True)
  for i in range(queries):
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "query" / f"{i}.png")
  return str(root / "support"), str(root / "query")


def test_bad_inputs_are_one_error_each(proto, tmp_path):
  workdir, model = proto
  support, query = _folders(tmp_path)
  run = lambda s=support, q=query, **kw: predict.run(model, predict.Inputs.list(s, q, kw.pop("shots", None)),
                                                     progress=False, **kw)
  with pytest.raises(DataError, match=r"class a of --support=.* has 2 image\(s\), fewer than --shots=3"):
    run(shots=3)
  os.makedirs(tmp_path / "support" / "empty")
  with pytest.raises(DataError, match=r"class folder .*empty holds no image \(extensions: .bmp"):
    run()
  os.rmdir(tmp_path / "support" / "empty")
  one = tmp_path / "one"
  _folders(one, classes=(("only", 2),))
  with pytest.raises(DataError, match="--support=.*one/support holds 1 class; a task needs at least 2"):
    run(s=str(one / "support"))
  with pytest.raises(DataError, match=r"--support=.*query holds image .*0.png outside a class folder \(3 in all\)"):
    run(s=query)
  (tmp_path / "flat").mkdir()
  with pytest.raises(DataError, match=r"--support=.*flat holds no class folder; expected --support=DIR/<class>/"):
    run(s=str(tmp_path / "flat"))
  with pytest.raises(DataError, match=r"--query=.*\*.jpeg matches no image file"):
    run(q=os.path.join(query, "*.jpeg"))
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "a.txt").write_text("x")
  with pytest.raises(DataError, match=r"matches no image file \(1 other file\(s\) skipped\)"):
    run(q=str(tmp_path / "notes"))
  with pytest.raises(DataError, match="--query file .*nope.png does not exist"):
    run(q=os.path.join(query, "0.png") + ",nope.png")
  assert predict.list_queries(f"{query}/0.png,{query}/[12].png,{support}")[0] == [  # a file, a glob, a folder
      f"{query}/0.png", f"{query}/1.png", f"{query}/2.png"] + [f"{support}/{c}/{i}.png" for c in "ab" for i in (0, 1)]
  with pytest.raises(ConfigError, match="prediction mode 'fancy' is not one of protonet's; valid: \\['default'\\]"):
    run(mode="fancy")
  limited = api.Model.__new__(api.Model)
  limited.__dict__.update(model.__dict__, method=dataclasses.replace(model.method, max_ways=1))
  with pytest.raises(ConfigError, match="2 classes are more than protonet takes in one task \\(at most 1\\)"):
    predict.run(limited, predict.Inputs.list(support, query), progress=False)
  (tmp_path / "support" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  with pytest.raises(DataError, match=r"cannot decode image .*b/broken.jpg"):
    run()
  os.remove(tmp_path / "support" / "b" / "broken.jpg")
  # An error after the progress bar started: the bar's line is ended first, so `error: ...` has its own.
  (tmp_path / "query" / "2.png").write_bytes(b"\x89PNG not a png")
  bar = io.StringIO()
  with pytest.raises(DataError, match=r"cannot decode image .*query/2.png"):
    predict.run(model, predict.Inputs.list(support, query), progress=True, stderr=bar, stdout=io.StringIO())
  if not os.environ.get("TQDM_DISABLE"):  # (a cleared bar would end in "\r", and the error would share its line)
    assert "predict:" in bar.getvalue() and bar.getvalue().endswith("\n"), repr(bar.getvalue()[-200:])
  _folders(tmp_path)  # 2.png restored
  # Non-image files are skipped and counted.
  (tmp_path / "support" / "a" / "notes.txt").write_text("x")
  (tmp_path / "query" / ".DS_Store").write_bytes(b"x")
  err = tmp_path / "err.txt"
  with open(err, "w") as e, open(tmp_path / "out.txt", "w") as o:
    summary = run(stderr=e, stdout=o)
  assert summary["skipped_files"] == 2 and summary["queries"] == 3 and summary["shots"] == 2
  assert "warning: skipped 2 file(s) that are not images" in err.read_text()
  assert len(read_lines((tmp_path / "out.txt").read_text())) == 3


def test_launch_errors_are_one_line_and_write_nothing(proto, tmp_path):
  workdir, _ = proto
  support, query = _folders(tmp_path, queries=5)
  data = (tmp_path / "query" / "3.png").read_bytes()
  (tmp_path / "query" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0" + data[4:200])  # a truncated JPEG, batch 2
  out = tmp_path / "pred.jsonl"
  common = (f"--support={support}", f"--query={query}", f"--out={out}", "--predict_batch=2")
  user_error(launch("--mode=predict", f"--workdir={workdir}", *common), "cannot decode image", "3.jpg")
  assert not out.exists() and not list(tmp_path.glob(".pred.jsonl*"))
  empty = tmp_path / "untrained"
  empty.mkdir()
  with open(os.path.join(workdir, "config.json")) as f:
    (empty / "config.json").write_text(f.read())
  user_error(launch("--mode=predict", f"--workdir={empty}", *common), "no best checkpoint", "train first")
  with pytest.raises(CheckpointError, match="has no config.json"):
    fewshot_jax.load(str(tmp_path / "query"))
  with pytest.raises(CheckpointError, match="does not exist"):
    fewshot_jax.load(str(tmp_path / "nowhere"))
  user_error(launch("--mode=predict", f"--workdir={workdir}", f"--support={support}"), "--query")


# ---------------------------------------------------------------- LGM-Net and IDeMe-Net


def test_lgmnet_toy_predicts_episode_files_as_evaluation_in_every_mode(prepared_dir, synthetic_test, tmp_path):
  config = load_config("lgmnet", "synthetic")
  config.model.features = 8
  config.method.update(context_features=8, z_dim=4, target_features=(8, 8), ensemble_draws=3)
  config.data.data_dir = prepared_dir
  config.eval.update(tasks=2, queries=3)
  model = fewshot_jax.load(save_workdir(config, tmp_path / "lgm"))
  assert set(model.modes) == {"single", "mean", "ensemble"} and model.mode == "single"
  ep = episode_zero(model, synthetic_test)
  support_dir, _, paths = write_task(tmp_path, ep["support"], ep["support_labels"], ep["query"])
  support_paths, support_labels = listed_support(support_dir)
  support, query = model.read_images(support_paths), model.read_images(paths)
  for mode in model.modes:
    labels, probs = model.predict(support, support_labels, query, mode=mode, batch_size=4)
    np.testing.assert_array_equal(labels, ep["scores"][mode].argmax(-1), err_msg=mode)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  # The generated weights are per task: any way count (5 above; docs/running.md says 2, 5, 9).
  for ways in (2, 9):
    labels, probs = model.predict(np.asarray(synthetic_test.images)[:ways * 20:20], np.arange(ways),
                                  np.asarray(synthetic_test.images)[1:ways * 20:20])
    assert labels.shape == (ways,) and probs.shape == (ways, ways), ways
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  features = jax.eval_shape(model.method.embed, model.params, model.model_state, jnp.zeros((2, 28, 28, 1)))
  assert features.shape == (2, 4, 4, 8)  # the Extractor's maps (28 -> 14 -> 7 -> 4)


def random_idemenet_variables(config, ti):
  """Numpy-random variables of method.init's shapes (an XLA:CPU ResNet init or gallery embedding costs
  tens of seconds to compile) and a gallery of the toy dataset's images with random features (they
  only steer the candidate choice), as tests/test_compare.py builds them."""
  method = methods.build(config)
  example = state_lib.train_example(method, config)
  abstract = jax.eval_shape(method.init, jax.random.key(0), example)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      return jnp.asarray(rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1])), jnp.float32)
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.6, 1.4, size=shape), jnp.float32)
    return jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, abstract["params"])
  to_weight = params["deformation"]["to_weight"]  # patch weights near 0.5 +- 0.3, as a trained D's
  to_weight["kernel"] = to_weight["kernel"] * (0.3 / float(jnp.abs(to_weight["kernel"]).sum(0).max()))
  to_weight["bias"] = to_weight["bias"] + 0.5
  images, _ = ti._images()  # pylint: disable=protected-access
  data = ti._dataset()  # pylint: disable=protected-access
  idx, labels = idemenet.choose_gallery(np.asarray(data.class_index), np.asarray(data.class_counts),
                                        config.method.gallery_per_class, 0)
  features = jnp.asarray(rng.normal(0, 10, (len(idx), 512)), jnp.float32)
  state = {"batch_stats": jax.tree_util.tree_map_with_path(fill, abstract["batch_stats"]),
           "gallery": {"images": jnp.asarray(images[idx]), "labels": jnp.asarray(labels), "features": features}}
  return params, state


def test_idemenet_toy_predicts_with_deformed_and_plain_supports(tmp_path):
  from tests import test_idemenet as ti  # pylint: disable=import-outside-toplevel
  config = ti._config()  # pylint: disable=protected-access
  config.eval.update(tasks=1, queries=2)
  params, state = random_idemenet_variables(config, ti)
  model = fewshot_jax.load(save_workdir(config, tmp_path / "idemenet", params, state))
  assert set(model.modes) == {"deformed", "plain"} and model.mode == "deformed"
  ep = episode_zero(model, ti._dataset())  # pylint: disable=protected-access
  support_dir, query_dir, paths = write_task(tmp_path, ep["support"], ep["support_labels"], ep["query"])
  inputs = predict.Inputs.list(support_dir, query_dir)
  for mode in ("deformed", "plain"):
    with open(tmp_path / f"{mode}.jsonl", "w") as out, open(tmp_path / "err.txt", "w") as err:
      predict.run(model, inputs, mode=mode, progress=False, stdout=out, stderr=err)
    lines = read_lines((tmp_path / f"{mode}.jsonl").read_text())
    got = np.array([int(l["label"].split("_")[1]) for l in lines])
    np.testing.assert_array_equal(got, ep["scores"][mode].argmax(-1), err_msg=mode)
  # A grey image for an RGB model: the channel repeated, as an RGB builder stores a grey file.
  grey = ep["query"][0].mean(-1).astype(np.uint8)
  Image.fromarray(grey).save(tmp_path / "grey.png")
  np.testing.assert_array_equal(model.read_images([str(tmp_path / "grey.png")])[0], np.repeat(grey[..., None], 3, -1))
  features = jax.eval_shape(model.method.embed, model.params, model.model_state, jnp.zeros((2, 32, 32, 3)))
  assert features.shape == (2, 512)  # E's features


def test_import_is_light():
  code = "import sys, fewshot_jax; print(any(m.startswith(('jax', 'flax', 'tensorflow')) for m in sys.modules))"
  assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        check=True).stdout.strip() == "False"
