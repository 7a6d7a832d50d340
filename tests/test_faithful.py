"""The authors' behaviours, each against a NumPy / SciPy statement of the original code's semantics.

LGM-Net (likesiwell/LGM-Net, data.py / meta_matching_network.py): scipy's
rotation, one query per task, the TF kernel layout. IDeMe-Net
(tankche1/IDeMe-Net, onlyBasetwoLoss.py / datasets/oneShotBaseCls.py): gallery
flip, train-mode gallery BatchNorm, Resize 256 + CenterCrop 224, the
classification loss over real and deformed supports, scale's constant
learning rate, round-2 loading.
"""

import functools
import io
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from fewshot_jax import config as config_lib
from fewshot_jax import state as state_lib
from fewshot_jax import methods
from fewshot_jax.data import augment
from fewshot_jax.data import episodes
from fewshot_jax.models import lgmnet as lgm
from tests.conftest import DATA, load_config


def _real_images(count: int) -> np.ndarray:
  """The first `count` miniImageNet JPEGs of the shipped images.tar, uint8 [count, 84, 84, 3]."""
  out = []
  with tarfile.open(DATA / "miniimagenet" / "images.tar") as archive:
    for member in archive:
      if member.isfile():
        out.append(np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")))
        if len(out) == count:
          break
  return np.stack(out)


def test_rotation_matches_scipy_on_real_images():
  """order 3 / 'nearest' is scipy.ndimage.rotate(reshape=False, mode='nearest') to 4e-3 of 255."""
  images = _real_images(4)
  rotate = jax.jit(jax.vmap(augment.rotate, in_axes=(0, None)))
  for angle in (-45.0, -11.25, 11.25, 45.0, 30.0):
    ours = np.asarray(rotate(jnp.asarray(images, jnp.float32), angle))
    ref = np.stack([scipy.ndimage.rotate(im.astype(np.float32), angle, reshape=False, mode="nearest")
                    for im in images])
    np.testing.assert_allclose(ours, ref, atol=4e-3, err_msg=f"angle {angle}")  # measured max 1.6e-3
    assert np.abs(ours[:, :4, :4]).mean() > 20  # edge replication: no blank corner
  # The bilinear zero-fill rotation leaves blank corners: 7% of the image at 11.25 degrees.
  zero_fill = jax.jit(lambda x: augment.rotate(x, 11.25, order=1, mode="constant"))(jnp.ones((84, 84, 1)))
  blank = float(jnp.mean(zero_fill < 0.5))
  assert 0.05 < blank < 0.09, blank


def test_one_query_per_task_sampler():
  """per_task: Q queries per task, classes uniform, distinct images, never a support."""
  labels = np.repeat(np.arange(8), 7)
  images = np.zeros((len(labels), 2, 2, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels))  # pixel = image index
  ds = jax.device_put(episodes.from_arrays(images, labels))
  sample = jax.jit(lambda k, q: episodes.sample_episodes(k, ds, tasks=2000, ways=5, shots=2, queries=q,
                                                          augment=lambda _, s, sl, x, xl: (s, x),
                                                          query_sampling="per_task"), static_argnums=1)
  ep = sample(jax.random.key(1), 1)
  assert ep.query.shape[:2] == (2000, 1) and ep.support.shape[:2] == (2000, 10)
  freq = np.bincount(np.asarray(ep.query_labels).ravel(), minlength=5) / 2000
  np.testing.assert_allclose(freq, 0.2, atol=0.036)  # 4 sigma of a binomial(2000, 0.2) share
  for q in (1, 4):
    ep = sample(jax.random.key(q), q)
    query_ids = np.asarray(ep.query[..., 0, 0, 0]).astype(int)
    support_ids = np.asarray(ep.support[..., 0, 0, 0]).astype(int)
    ql, sl = np.asarray(ep.query_labels), np.asarray(ep.support_labels)
    for t in range(50):
      assert len(set(query_ids[t])) == q and not set(query_ids[t]) & set(support_ids[t])
      for j in range(q):  # a query shows an image of the class its label names
        same = support_ids[t][sl[t] == ql[t, j]]
        assert labels[query_ids[t, j]] == labels[same[0]]


def test_lgmnet_mini_preset_trains_on_one_query_per_task():
  """32 tasks of 5 supports + 1 query: the intertask BatchNorm batch is 32 x (5 * 1 + 1) images."""
  c = config_lib.validate(load_config("lgmnet", "mini-5w1s"))
  assert (c.episode.query_sampling, c.episode.queries, c.episode.tasks) == ("per_task", 1, 32)
  assert (c.augment.rotation_order, c.augment.rotation_mode) == (3, "nearest")
  example = state_lib.train_example(methods.build(c), c)
  from fewshot_jax.methods import common  # pylint: disable=g-import-not-at-top
  images, _ = jax.eval_shape(lambda e: (common.flatten_images(e)[0], 0), example)
  assert images.shape[0] == 32 * (5 * 1 + 1)


def test_generated_kernel_tf_layout():
  """kernel_layout='tf': numpy reshape to (N, C_in, kh, kw), then reverse all axes (tf.transpose)."""
  shapes = ((3, 2, 4, 5),)  # kh != kw so a swapped spatial axis cannot pass
  z = jax.random.normal(jax.random.key(0), (2, 6))
  noise = jnp.zeros((2, 1, 6))
  gen = lgm.WeightGenerator(layer_shapes=shapes, kernel_layout="tf")
  variables = gen.init(jax.random.key(1), z, z, noise)
  (kernel,), _ = gen.apply(variables, z, jnp.full_like(z, -30.0), noise)  # exp(-15): z = mu
  dense = variables["params"]["layer1"]
  out = np.asarray(z) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  kh, kw, cin, n = shapes[0]
  for t in range(2):
    w = out[t, :kh * kw * cin * n].reshape(n, cin, kh, kw).transpose()  # (kw, kh, C_in, N)
    w = w / np.sqrt(np.maximum((w ** 2).sum(axis=(0, 1, 2), keepdims=True), 1e-12))
    np.testing.assert_allclose(kernel[t], w, rtol=1e-5, atol=1e-6)
  hwio = lgm.WeightGenerator(layer_shapes=shapes)
  (kernel_hwio,), _ = hwio.apply(variables, z, jnp.full_like(z, -30.0), noise)
  assert kernel_hwio.shape == (2, 3, 2, 4, 5) and kernel.shape == (2, 2, 3, 4, 5)
  np.testing.assert_allclose(kernel_hwio, jnp.swapaxes(kernel, 1, 2), rtol=1e-6)


def test_bad_faithfulness_settings_name_the_key():
  from fewshot_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  for key, value, match in (("episode.query_sampling", "per_batch", "episode.query_sampling"),
                            ("augment.rotation_mode", "reflect", "augment.rotation_order"),
                            ("data.center_crop", 1.5, "data.center_crop"),
                            ("method.kernel_layout", "oihw", "method.kernel_layout")):
    c = load_config("lgmnet", "mini-5w1s")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
      methods.build(config_lib.validate(c))


# IDeMe-Net ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ideme_variables():
  """test_idemenet's small IDeMe-Net's (params, state), built once: no method.* value below changes them."""
  from tests import test_idemenet as ti  # pylint: disable=g-import-not-at-top
  config = ti._config()  # pylint: disable=protected-access
  return ti._variables(methods.build(config), config)  # pylint: disable=protected-access


def _ideme(**method):
  """(test_idemenet module, config, method, params, state) of test_idemenet's small IDeMe-Net."""
  from tests import test_idemenet as ti  # pylint: disable=g-import-not-at-top
  config = ti._config(**method)  # pylint: disable=protected-access
  params, state = _ideme_variables()
  return ti, config, methods.build(config), params, state


def _variant(ti, **method):
  """The same small IDeMe-Net's method under other method.* values (same params and state)."""
  return methods.build(ti._config(**method))  # pylint: disable=protected-access


def test_gallery_image_is_flipped_half_the_time_on_its_own_draw():
  ti, config, method, params, state = _ideme(choose_num=1, augnum=4)
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  ep = ti._episode(config, tasks=4)  # pylint: disable=protected-access
  deform = jax.jit(method.deform)
  gal = np.asarray(idemenet.preprocess(config, state["gallery"]["images"]))
  support = np.asarray(ep.support)[:, :, None]
  flips, both = [], []
  for seed in range(8):
    probe, gallery, _, _ = jax.device_get(deform(params, state, ep, jax.random.split(jax.random.key(seed), 4)))
    close = lambda a, b: np.all(np.isclose(a, b, atol=1e-5), axis=(-3, -2, -1))
    plain = np.stack([close(gallery, g) for g in gal]).any(0)
    flipped = np.stack([close(gallery, g[:, ::-1]) for g in gal]).any(0)
    assert np.all(plain ^ flipped)  # each copy is one candidate, flipped or not (these are not symmetric)
    probe_flipped = close(probe, support[..., ::-1, :])
    flips.append(flipped)
    both.append(flipped & probe_flipped)
  n = np.size(flips)  # 8 keys x 4 tasks x 5 supports x 4 copies = 640 draws
  assert abs(np.mean(flips) - 0.5) < 4 * np.sqrt(0.25 / n), np.mean(flips)
  assert abs(np.mean(both) - 0.25) < 4 * np.sqrt(0.1875 / n), np.mean(both)  # independent of the probe's
  method0 = _variant(ti, choose_num=1, augnum=4, gallery_flip=0.0)
  _, gallery, _, _ = jax.device_get(jax.jit(method0.deform)(params, state, ep, jax.random.split(jax.random.key(0), 4)))
  assert np.all(np.stack([np.all(np.isclose(gallery, g, atol=1e-5), axis=(-3, -2, -1)) for g in gal]).any(0))


def _numpy_batchnorm_update(running, inputs, momentum=0.1):
  """PyTorch's BatchNorm2d training-mode update of (mean, var) from NHWC inputs: unbiased variance."""
  x = inputs.reshape(-1, inputs.shape[-1]).astype(np.float64)
  n = len(x)
  mean, var = running
  return ((1 - momentum) * mean + momentum * x.mean(0),
          (1 - momentum) * var + momentum * x.var(0) * n / (n - 1))


def test_train_mode_gallery_features_and_recalibrated_statistics():
  """Chunks of the class-sorted gallery in order, batch statistics each, running stats moved as PyTorch."""
  import flax  # pylint: disable=g-import-not-at-top
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  ti, config, _, params, state = _ideme(gallery_bn="train", gallery_bn_chunk=12)
  images = state["gallery"]["images"]  # 8 classes x 3, class-sorted: two chunks of 12
  model = idemenet.embedding_model(config)
  e_vars = {"params": params["embedding"], "batch_stats": state["batch_stats"]["embedding"]}
  feats, stats = idemenet.gallery_features(model, e_vars, images, config)

  @jax.jit
  def batchnorm_inputs(x):
    """Train-mode features of one chunk and the input of every BatchNorm, by module path."""
    seen = {}

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, flax.linen.BatchNorm):
        seen["/".join(context.module.path)] = args[0]
      return next_fun(*args, **kwargs)

    with flax.linen.intercept_methods(record):
      (features, _), _ = model.apply(e_vars, x, train=True, mutable=["batch_stats"])
    return features, seen

  # NumPy statement: every BatchNorm's input, chunk by chunk, through PyTorch's update.
  flat0 = flax.traverse_util.flatten_dict(e_vars["batch_stats"])
  running = {"/".join(p[:-1]): (np.asarray(flat0[p[:-1] + ("mean",)], np.float64),
                                np.asarray(flat0[p[:-1] + ("var",)], np.float64)) for p in flat0}
  x = idemenet.preprocess(config, images)
  for start in (0, 12):
    want, seen = jax.device_get(batchnorm_inputs(x[start:start + 12]))
    np.testing.assert_allclose(feats[start:start + 12], want, rtol=1e-3, atol=2e-3)  # jit rounding
    assert set(seen) == set(running)
    for path, inputs in seen.items():
      running[path] = _numpy_batchnorm_update(running[path], inputs)
  flat = flax.traverse_util.flatten_dict(stats)
  for path, (mean, var) in running.items():
    key = tuple(path.split("/"))
    np.testing.assert_allclose(flat[key + ("mean",)], mean, rtol=1e-3, atol=1e-4, err_msg=path)
    np.testing.assert_allclose(flat[key + ("var",)], var, rtol=1e-3, atol=1e-4, err_msg=path)
  moved = [not np.allclose(flat[k], v) for k, v in flat0.items()]
  assert all(moved)  # every statistic recalibrated
  # 'eval': running statistics, untouched.
  config_e = ti._config(gallery_bn="eval")  # pylint: disable=protected-access
  feats_e, stats_e = idemenet.gallery_features(model, e_vars, images, config_e)
  eval_feats = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(e_vars, x)
  np.testing.assert_allclose(feats_e, eval_feats, rtol=1e-3, atol=1e-3)
  assert jax.tree.all(jax.tree.map(np.array_equal, stats_e, e_vars["batch_stats"]))


def _numpy_resize_center_crop(image, full, size):
  """torchvision Resize(full) (bilinear, half-pixel centres; upsampling) + CenterCrop(size) in NumPy."""
  h = image.shape[0]
  src = np.clip((np.arange(full) + 0.5) * h / full - 0.5, 0, h - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, h - 1)
  t = src - lo
  rows = image[lo] * (1 - t)[:, None, None] + image[hi] * t[:, None, None]
  out = rows[:, lo] * (1 - t)[None, :, None] + rows[:, hi] * t[None, :, None]
  top = int(round((full - size) / 2.0))
  return out[top:top + size, top:top + size]


@pytest.mark.parametrize("size", [224, 84])
def test_center_crop_is_resize_then_central_crop(size):
  """data.center_crop=0.875: 84 px -> Resize 256 + CenterCrop 224 (or 96 + 84), one resampling."""
  image = _real_images(1)[0].astype(np.float64)
  ours = np.asarray(jax.jit(lambda x: augment.resize(x, size, 0.875))(jnp.asarray(image, jnp.float32)))
  want = _numpy_resize_center_crop(image, int(round(size / 0.875)), size)
  np.testing.assert_allclose(ours, want, atol=2e-3)
  c = load_config("idemenet", "mini-5w1s")
  assert c.data.center_crop == 0.875 and c.data.input_size == 224
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  c.data.input_size = size
  pre = np.asarray(idemenet.preprocess(c, jnp.asarray(image[None], jnp.uint8)))[0]
  np.testing.assert_allclose(pre, (want - np.asarray(c.data.mean)) / np.asarray(c.data.std), atol=1e-4)


def test_classification_loss_sees_real_and_deformed_supports():
  """cls_images='all': mean 64-way cross-entropy over the real supports and their augnum copies."""
  import optax  # pylint: disable=g-import-not-at-top
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  ti, config, method, params, state = _ideme(fix_embedding=False)
  method_d = _variant(ti, fix_embedding=False, cls_images="deformed")
  ep = ti._episode(config, tasks=2)  # pylint: disable=protected-access
  key = jax.random.key(4)
  conv1_grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss(p, state, ep, key), has_aux=True))
  (_, (metrics, _)), grads = conv1_grad(method)(params)
  (_, (metrics_d, _)), grads_d = conv1_grad(method_d)(params)
  _, _, _, deformed = jax.jit(method.deform)(params, state, ep, jax.random.split(key, 2))  # the loss's keys
  model = idemenet.embedding_model(config)
  e_vars = {"params": params["embedding"], "batch_stats": state["batch_stats"]["embedding"]}
  logits = jax.jit(lambda x: model.apply(e_vars, x, train=False)[1])
  classes, labels = np.asarray(ep.classes), np.asarray(ep.support_labels)
  t, s, a = deformed.shape[:3]
  ce = lambda images, targets: np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits(images), targets))
  real = [ce(ep.support[i], classes[i][labels[i]]) for i in range(t)]
  copies = [ce(deformed[i].reshape((s * a,) + deformed.shape[3:]), np.repeat(classes[i][labels[i]], a))
            for i in range(t)]
  np.testing.assert_allclose(metrics["cls_loss"], np.mean(np.concatenate(real + copies)), rtol=1e-4)
  np.testing.assert_allclose(metrics_d["cls_loss"], np.mean(np.concatenate(copies)), rtol=1e-4)
  # The real supports' term reaches E: the two losses' gradients for E differ.
  e_grad = lambda g: g["embedding"]["conv1"]["kernel"]
  assert not np.allclose(e_grad(grads), e_grad(grads_d))


def test_scale_learning_rate_is_constant_unlike_the_others():
  """decay_scale=False (reference): Adam on `scale` steps by lr at every step; D's halves at decay_every."""
  from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
  ti, _, _, params, _ = _ideme()
  for decay_scale, after in ((False, 1e-3), (True, 5e-4)):
    config = ti._config(decay_every=3, decay_scale=decay_scale)  # pylint: disable=protected-access
    tx = idemenet.make_optimizer(config)
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)  # constant gradient: Adam's step is lr
    update = jax.jit(tx.update)
    steps = []
    for _ in range(5):
      u, opt = update(grads, opt, params)
      steps.append((float(-u["scale"]), float(-jax.tree.leaves(u["deformation"])[0].ravel()[0])))
    np.testing.assert_allclose(steps[0], (1e-3, 1e-3), rtol=1e-4)
    np.testing.assert_allclose(steps[4], (after, 5e-4), rtol=1e-4)  # step 4 >= decay_every
