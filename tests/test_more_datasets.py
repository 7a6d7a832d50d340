"""CIFAR-FS, FC100, tieredImageNet and CUB builders on format fixtures (no real copy here),
their errors, and every new preset: validated, and a few training steps per dataset.

Fixtures (tests/format_fixtures.py) hold every class of the packaged lists with 1-3
tiny images each, in the exact on-disk layout of the real distributions.
"""

import json
import os
import pickle
import subprocess
import sys
import weakref

import numpy as np
import pytest

from fewshot_jax import config as config_lib
from fewshot_jax.data import cifar, image_files, registry, sources, tiered_imagenet
from fewshot_jax.data.builders import make_builder, prepare
from fewshot_jax.errors import DataError
from tests import format_fixtures as ff
from tests.conftest import REPO, load_config

EXPECTED = {'cifar_fs': (64, 16, 20), 'fc100': (60, 20, 20), 'tiered_imagenet': (351, 97, 160),
            'cub': (100, 50, 50)}


def _builder(name, data_dir, manual):
  record = registry.get(name)
  return make_builder(name, scheme=record.schemes[0], image_size=record.image_size, data_dir=data_dir,
                      manual_dir=manual)


def _read(builder):
  """{split: (images [N, H, W, C], labels [N])}."""
  out = {}
  for split, source in builder.as_data_source().items():
    examples = source.__getitems__(list(range(len(source))))
    out[split] = (np.stack([e['image'] for e in examples]), np.array([int(e['label']) for e in examples]))
  return out


def _check_splits(name, data, size):
  """Class counts per split equal the packaged lists, labels are global and disjoint."""
  seen, offset = set(), 0
  assert registry.get(name).base_classes == EXPECTED[name][0]
  for split, expected in zip(sources.SPLITS, EXPECTED[name]):
    images, labels = data[split]
    assert len(sources.class_list(name, split)) == expected
    assert sorted(set(labels.tolist())) == list(range(offset, offset + expected))
    assert not seen & set(labels.tolist())
    seen |= set(labels.tolist())
    assert images.shape[1:] == (size, size, 3) and images.dtype == np.uint8
    offset += expected


@pytest.fixture(scope='module')
def fixtures(tmp_path_factory):
  root = tmp_path_factory.mktemp('format_fixtures')
  return {'cifar_tar': ff.write_cifar100(root / 'cifar_tar'),
          'cifar_folder': ff.write_cifar100(root / 'cifar_folder', layout='folder'),
          'tiered': ff.write_tiered_pickles(root / 'tiered', per_class=2),
          'cub': ff.write_cub(root / 'cub', per_class=2)}


# ---------------------------------------------------------------- builders


def test_cifar_fs_and_fc100(fixtures, tmp_path):
  source = fixtures['cifar_folder'] / 'cifar-100-python'
  raw = {n: pickle.loads((source / n).read_bytes(), encoding='latin1') for n in ('train', 'test')}
  for name, manual in (('cifar_fs', fixtures['cifar_tar']), ('fc100', fixtures['cifar_folder'])):
    builder = prepare(_builder(name, tmp_path / name, manual))
    data = _read(builder)
    _check_splits(name, data, 32)
    names = builder.info.features['label'].names
    assert names == [r[1] for s in sources.SPLITS for r in sources.class_list(name, s)]
    # All 3 images of a class (2 of the train file, then 1 of the test file), pixels as stored (RGB planes).
    images, labels = data['train']
    fine = ff.CIFAR100_FINE.index(names[0])
    expected = np.concatenate([raw[p]['data'][np.array(raw[p]['fine_labels']) == fine] for p in ('train', 'test')])
    np.testing.assert_array_equal(images[labels == 0], expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  # The statistics helper for data.mean / data.std agrees with numpy on the prepared train split.
  pixels = data['train'][0].reshape(-1, 3).astype(np.float64)
  mean, std = sources.channel_stats(builder, chunk=50)
  np.testing.assert_allclose(mean, pixels.mean(0), atol=0.006)
  np.testing.assert_allclose(std, pixels.std(0), atol=0.006)
  # FC100 splits are whole superclasses: 12 / 4 / 4 of TADAM's split.
  coarse = {s: sorted({ff.COARSE_OF[ff.CIFAR100_FINE.index(r[1])] for r in sources.class_list('fc100', s)})
            for s in sources.SPLITS}
  assert coarse == {'train': [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], 'val': [8, 11, 13, 16], 'test': [0, 7, 12, 14]}


def test_tiered_imagenet_pickles_and_folder(fixtures, tmp_path):
  data = _read(prepare(_builder('tiered_imagenet', tmp_path / 'pkl', fixtures['tiered'])))
  _check_splits('tiered_imagenet', data, 84)
  assert len(data['train'][1]) == 2 * 351
  images, labels = data['val']  # val image 0 is fixture image 2 * 351 (label 351)
  assert labels[0] == 351
  np.testing.assert_array_equal(images[0], ff.tiered_image(2 * 351))
  folder = ff.write_tiered_folder(tmp_path / 'folder')
  from_folder = _read(prepare(_builder('tiered_imagenet', tmp_path / 'tfds_folder', folder)))
  _check_splits('tiered_imagenet', from_folder, 84)
  assert all(len(from_folder[s][1]) == n for s, n in zip(sources.SPLITS, EXPECTED['tiered_imagenet']))


def test_tiered_pickle_is_read_as_a_stream(tmp_path):
  """The image pickle's items come out one pickled batch (1,000) at a time; nothing keeps the others."""
  items = [np.frombuffer(os.urandom(2000), np.uint8).reshape(-1, 1).copy() for _ in range(2500)]
  path = tmp_path / 'images.pkl'
  path.write_bytes(pickle.dumps(items, protocol=2))
  with open(path, 'rb') as f:
    stream = sources._ListStream(f)  # pylint: disable=protected-access
    alive, count = [], 0
    for i, item in enumerate(stream.items()):
      np.testing.assert_array_equal(item, items[i])
      alive.append(weakref.ref(item))
      count += 1
      del item
      assert len(stream.pending) <= 1000 and stream.root == []  # the list itself never grows
      assert sum(r() is not None for r in alive) <= 1000
  assert count == 2500
  assert len(stream.memo) >= 2500 and len(stream.memo.keys()) < 20  # numbered, but only globals/dtypes kept


def test_cub_folder_and_tgz_agree(fixtures, tmp_path):
  folder = _read(prepare(_builder('cub', tmp_path / 'folder', fixtures['cub'])))
  _check_splits('cub', folder, 84)
  tgz = _read(prepare(_builder('cub', tmp_path / 'tgz', ff.write_cub(tmp_path / 'cub_tgz', 2, 'tgz'))))
  for split in sources.SPLITS:
    assert len(folder[split][1]) == 2 * len(sources.class_list('cub', split))
    np.testing.assert_array_equal(np.sort(folder[split][1]), np.sort(tgz[split][1]))
  # The Chen et al. rule over the 200 sorted folders: 0-based i % 2 == 0 train, % 4 == 1 val, % 4 == 3 test.
  names = sorted(r[0] for s in sources.SPLITS for r in sources.class_list('cub', s))
  assert [r[0] for r in sources.class_list('cub', 'val')] == names[1::4]
  assert [r[0] for r in sources.class_list('cub', 'test')] == names[3::4]


def test_second_prepare_does_not_decode(fixtures, tmp_path, monkeypatch):
  for name, manual in (('cifar_fs', fixtures['cifar_tar']), ('cub', fixtures['cub'])):
    prepare(_builder(name, tmp_path, manual))
  def fail(*args, **kwargs):
    raise AssertionError('decoded again')
  monkeypatch.setattr(cifar, 'read_cifar100', fail)
  monkeypatch.setattr(image_files.Image, 'open', fail)  # no file decoded
  for name, manual in (('cifar_fs', fixtures['cifar_tar']), ('cub', fixtures['cub'])):
    assert prepare(_builder(name, tmp_path, manual)).is_prepared()


# ---------------------------------------------------------------- errors name the file


def test_errors_name_the_bad_file(fixtures, tmp_path):
  # A truncated tar.gz.
  bad = tmp_path / 'cifar_truncated'
  bad.mkdir()
  data = (fixtures['cifar_tar'] / cifar.ARCHIVE).read_bytes()
  (bad / cifar.ARCHIVE).write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=str(bad / cifar.ARCHIVE)):
    prepare(_builder('cifar_fs', tmp_path / 't1', bad))
  # A missing labels pickle.
  tiered = tmp_path / 'tiered'
  tiered.mkdir()
  for f in fixtures['tiered'].iterdir():
    if f.name != 'val_labels.pkl':
      (tiered / f.name).symlink_to(f)
  with pytest.raises(DataError, match=str(tiered / 'val_labels.pkl')):
    prepare(_builder('tiered_imagenet', tmp_path / 't2', tiered))
  # A truncated image pickle: named, and no half-written dataset left behind.
  data = (fixtures['tiered'] / 'test_images_png.pkl').read_bytes()
  (tiered / 'test_images_png.pkl').unlink()
  (tiered / 'test_images_png.pkl').write_bytes(data[:len(data) // 2])
  (tiered / 'val_labels.pkl').symlink_to(fixtures['tiered'] / 'val_labels.pkl')
  with pytest.raises(DataError, match=str(tiered / 'test_images_png.pkl')):
    prepare(_builder('tiered_imagenet', tmp_path / 't3', tiered))
  assert not _builder('tiered_imagenet', tmp_path / 't3', tiered).is_prepared()
  # Labels of another split (a class list that does not match).
  (tiered / 'val_labels.pkl').unlink()
  (tiered / 'val_labels.pkl').symlink_to(fixtures['tiered'] / 'test_labels.pkl')
  with pytest.raises(DataError, match=f'{tiered / "val_labels.pkl"}.*160 classes.*97'):
    tiered_imagenet.read_labels(tiered / 'val_labels.pkl', 'val')
  # Only the decompressed .npz cache: named, with what is expected instead.
  npz = tmp_path / 'tiered_npz'
  npz.mkdir()
  (npz / 'train_images.npz').write_bytes(b'')
  with pytest.raises(DataError, match='images.npz.*_images_png.pkl'):
    prepare(_builder('tiered_imagenet', tmp_path / 't5', npz))
  # A CUB classes.txt that does not match the packaged list.
  broken = ff.write_cub(tmp_path / 'cub_renamed', 1)
  classes = broken / 'CUB_200_2011' / 'classes.txt'
  classes.write_text(classes.read_text().replace('001.Black_footed_Albatross', '001.Albatross'))
  with pytest.raises(DataError, match=f'{classes}.*001.Albatross'):
    prepare(_builder('cub', tmp_path / 't4', broken))


# ---------------------------------------------------------------- presets

NEW_PRESETS = [(m, p) for m in ('protonet', 'matchingnet', 'lgmnet')
               for p in ('cifarfs-5w1s', 'cifarfs-5w5s', 'fc100-5w1s', 'fc100-5w5s', 'tiered-5w1s', 'tiered-5w5s',
                         'cub-5w1s', 'cub-5w5s')] + [('lgmnet', 'fc100-20w1s'), ('lgmnet', 'fc100-20w5s')] + \
    [('idemenet', p) for p in ('tiered-pretrain', 'tiered-5w1s', 'tiered-5w5s', 'cub-pretrain', 'cub-5w1s',
                               'cub-5w5s')]


@pytest.mark.parametrize('method, preset', NEW_PRESETS)
def test_new_presets_validate(method, preset):
  c = config_lib.validate(load_config(method, preset))
  dataset = {'cifarfs': 'cifar_fs', 'fc100': 'fc100', 'tiered': 'tiered_imagenet', 'cub': 'cub'}[preset.split('-')[0]]
  assert c.data.name == dataset and c.data.mean == registry.get(dataset).mean
  assert c.data.placement == ('sharded' if dataset == 'tiered_imagenet' else 'replicated')


_TINY = ['--config.train.steps=2', '--config.train.eval_every=2', '--config.train.log_every=1',
         '--config.train.steps_per_call=2', '--config.train.checkpoint_every=2', '--config.eval.val_episodes=2',
         '--config.eval.episodes=2', '--config.eval.tasks=1', '--config.eval.queries=1',
         '--config.episode.queries=1', '--config.episode.tasks=1', '--config.episode.train_ways=0']


def test_new_preset_trains_through_launch(fixtures, tmp_path):
  """A few steps and an evaluation of a new dataset's preset on its fixture, as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  run = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/protonet.py:cifarfs-5w1s', '--mode=train_eval',
       f'--workdir={tmp_path / "work"}', f'--config.data.manual_dir={fixtures["cifar_tar"]}',
       f'--config.data.data_dir={tmp_path / "tfds"}', *_TINY],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])  # --mode=train_eval ends with the test result
  assert result['dataset'] == 'cifar_fs' and 0.0 <= result['accuracy'] <= 100.0


@pytest.mark.parametrize('method, preset, fixture, overrides', [
    ('protonet', 'fc100-5w5s', 'cifar_folder', {'episode.shots': 2}),
    ('protonet', 'tiered-5w1s', 'tiered', {}),
    ('protonet', 'cub-5w1s', 'cub', {}),
    ('lgmnet', 'fc100-20w1s', 'cifar_folder', {'episode.tasks': 2}),
])
def test_new_presets_train(method, preset, fixture, overrides, fixtures, tmp_path):
  """The other datasets' presets through what --mode=train_eval calls, in this process (one
  subprocess per preset would cost ~20 s of start-up and compilation each)."""
  from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fewshot_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  c = load_config(method, preset)
  c.data.manual_dir, c.data.data_dir = str(fixtures[fixture]), str(tmp_path / 'tfds')
  for flag in _TINY:
    key, value = flag[len('--config.'):].split('=')
    section, name = key.split('.')
    c[section][name] = int(value)
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  train_lib.train_and_evaluate(c, str(tmp_path / 'work'))
  result = evaluate.evaluate_checkpoint(c, str(tmp_path / 'work'))
  assert result['dataset'] == c.data.name and 0.0 <= result['accuracy'] <= 100.0


@pytest.mark.parametrize('method, preset, fixture', [
    ('protonet', 'cifarfs-5w1s', 'cifar_tar'), ('lgmnet', 'fc100-20w5s', 'cifar_folder'),
    ('protonet', 'tiered-5w5s', 'tiered'), ('idemenet', 'cub-5w1s', 'cub')])
def test_preset_data_loads_for_the_step(method, preset, fixture, fixtures, tmp_path):
  """What the trainer feeds the jitted step: each split of the preset's dataset on the device."""
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  c = load_config(method, preset)
  c.data.manual_dir, c.data.data_dir = str(fixtures[fixture]), str(tmp_path)
  for split, classes in zip(sources.SPLITS, EXPECTED[c.data.name]):
    data = input_pipeline.load(c, split)
    size = c.data.image_size
    assert data.num_classes == classes and data.images.shape[1:] == (size, size, 3)
    assert str(data.images.dtype) == 'uint8'
