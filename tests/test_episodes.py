"""On-device episode sampler and augmentation: generated fixtures and real Omniglot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fewshot_jax.data import augment
from fewshot_jax.data import episodes
from fewshot_jax.data import input_pipeline
from fewshot_jax.errors import ConfigError


def _fixture_dataset(num_classes=12, per_class=(7, 9, 11), size=4):
  """Images whose first pixel encodes the image id, uneven class sizes, shuffled order."""
  counts = [per_class[c % len(per_class)] for c in range(num_classes)]
  labels = np.concatenate([np.full(n, 100 + c) for c, n in enumerate(counts)])
  rng = np.random.default_rng(0)
  labels = labels[rng.permutation(len(labels))]
  images = np.zeros((len(labels), size, size, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256
  images[:, 0, 1, 0] = np.arange(len(labels)) // 256
  return episodes.from_arrays(images, labels), labels


def _ids(x):
  x = np.asarray(np.round(np.asarray(x) * 255)).astype(int)
  return x[..., 0, 0, 0] + 256 * x[..., 0, 1, 0]


def test_from_arrays_groups_by_label():
  ds, labels = _fixture_dataset()
  assert ds.num_classes == 12
  for row, cid in enumerate(np.asarray(ds.class_ids)):
    members = np.asarray(ds.class_index)[row, :int(ds.class_counts[row])]
    assert set(members) == set(np.flatnonzero(labels == cid))


def test_episode_shapes_labels_and_no_duplicates():
  ds, labels = _fixture_dataset()
  ways, shots, queries, tasks = 5, 2, 4, 16
  ep = jax.jit(lambda k: episodes.sample_episodes(k, jax.device_put(ds), tasks=tasks, ways=ways,
                                                 shots=shots, queries=queries))(jax.random.key(3))
  assert ep.support.shape == (tasks, ways * shots, 4, 4, 1)
  assert ep.query.shape == (tasks, ways * queries, 4, 4, 1)
  s_ids, q_ids = _ids(ep.support), _ids(ep.query)
  for t in range(tasks):
    classes = np.asarray(ep.classes[t])
    assert len(set(classes)) == ways  # distinct classes
    both = np.concatenate([s_ids[t], q_ids[t]])
    assert len(set(both)) == len(both)  # no image twice in an episode
    for ids, lab in ((s_ids[t], ep.support_labels[t]), (q_ids[t], ep.query_labels[t])):
      # Label l means the image belongs to global class classes[l].
      np.testing.assert_array_equal(labels[ids], classes[np.asarray(lab)])
    np.testing.assert_array_equal(np.bincount(np.asarray(ep.support_labels[t]), minlength=ways),
                                  np.full(ways, shots))


def test_label_order_is_random():
  ds, _ = _fixture_dataset()
  ep = episodes.sample_episodes(jax.random.key(0), jax.device_put(ds), tasks=64, ways=5, shots=1,
                                queries=1)
  classes = np.asarray(ep.classes)
  assert not np.all(np.diff(classes, axis=1) > 0), "classes always sorted: label order not random"


def test_deterministic_given_key():
  ds = jax.device_put(_fixture_dataset()[0])
  f = lambda k: episodes.sample_episodes(k, ds, tasks=4, ways=3, shots=1, queries=2)
  a, b, c = f(jax.random.key(7)), f(jax.random.key(7)), f(jax.random.key(8))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.classes, c.classes)


def test_class_and_image_frequencies_roughly_uniform():
  ds, labels = _fixture_dataset()
  ep = jax.jit(lambda k: episodes.sample_episodes(k, jax.device_put(ds), tasks=4000, ways=3,
                                                 shots=1, queries=1))(jax.random.key(1))
  counts = np.bincount(np.asarray(ep.classes).ravel() - 100, minlength=12)
  expected = 4000 * 3 / 12
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
  # Images of a class are also drawn uniformly, padding rows never.
  ids = np.concatenate([_ids(ep.support).ravel(), _ids(ep.query).ravel()])
  per_image = np.bincount(ids, minlength=len(labels))
  for cid in (100, 101, 102):
    members = per_image[labels == cid]
    assert members.min() > 0.6 * members.mean()


def test_check_episode_fits_errors():
  ds, _ = _fixture_dataset()
  with pytest.raises(ConfigError, match=r"ways=13 .* 12 classes"):
    episodes.check_episode_fits(ds, 13, 1, 1, "train")
  with pytest.raises(ConfigError, match=r"4 \+ 4 = 8 .* 7 images"):
    episodes.check_episode_fits(ds, 5, 4, 4, "train")
  episodes.check_episode_fits(ds, 12, 3, 4, "train")


def test_rotate_matches_rot90_and_flip():
  img = jnp.asarray(np.random.default_rng(0).random((9, 9, 2)), jnp.float32)
  np.testing.assert_allclose(augment.rotate(img, 90.0), np.rot90(img, 1), atol=1e-5)
  np.testing.assert_allclose(augment.rotate(img, 0.0), img, atol=1e-6)
  flipped = augment.flip(jax.random.key(0), img[None], 1.0)[0]
  np.testing.assert_array_equal(flipped, img[:, ::-1])


def test_task_augment_rotates_each_class_consistently():
  rng = np.random.default_rng(0)
  support = jnp.asarray(rng.integers(0, 255, (4, 8, 8, 1)), jnp.uint8)
  labels = jnp.array([0, 0, 1, 1])
  s, q = augment.task_augment(jax.random.key(0), support, labels, support, labels, mean=0.0, std=255.0,
                              size=8, class_rotations=(90.0, 180.0), ways=2)
  assert s.shape == (4, 8, 8, 1) and s.dtype == jnp.float32
  np.testing.assert_allclose(s, q)  # same class -> same angle for supports and queries
  raw = np.asarray(support, np.float32) / 255
  for i in range(4):  # each image rotated by 90 or 180, same angle within a class
    options = [np.rot90(raw[i], k) for k in (1, 2)]
    match = [np.allclose(s[i], o, atol=1e-5) for o in options]
    assert any(match)
  same_class = [np.allclose(s[1], np.rot90(raw[1], k), atol=1e-5) == np.allclose(s[0], np.rot90(raw[0], k),
                                                                                 atol=1e-5) for k in (1, 2)]
  assert all(same_class)
  resized, _ = augment.task_augment(jax.random.key(0), support, labels, support, labels, mean=128.0,
                                    std=64.0, size=16)
  assert resized.shape == (4, 16, 16, 1)
  assert abs(float(resized.mean()) - (float(np.mean(raw * 255)) - 128) / 64) < 0.05


def test_split_isolation_on_real_omniglot(make_config):
  config = make_config("protonet", "omniglot-5w1s")
  builder = input_pipeline.builder_from_config(config)
  train = episodes.load_split(builder, "train")
  test = episodes.load_split(builder, "test")
  assert (train.num_classes, test.num_classes) == (4112, 1692)
  assert set(np.asarray(train.class_ids)).isdisjoint(np.asarray(test.class_ids))
  ep = episodes.sample_episodes(jax.random.key(0), test, tasks=50, ways=20, shots=1, queries=5)
  assert set(np.asarray(ep.classes).ravel()) <= set(np.asarray(test.class_ids))
  # Real images: ink is sparse but present in every sampled image.
  ink = np.asarray(ep.support).mean(axis=(2, 3, 4))
  assert np.all(ink > 0.01) and np.all(ink < 0.5)
