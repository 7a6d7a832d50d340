"""The image_folder dataset (data/image_folder.py) on folders of real image files written with Pillow:
formats and modes, both layouts, statistics, re-preparation of a changed folder, every bad input as one
error with nothing left prepared, its presets, and a short ProtoNet run through launch.py on Omniglot
characters written out as PNGs."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, features

from fewshot_jax import config as config_lib
from fewshot_jax.data import builders, image_files, input_pipeline, sources
from fewshot_jax.data.episodes import check_episode_fits
from fewshot_jax.errors import ConfigError, DataError
from tests.conftest import DATA, REPO, load_config
from tests.test_more_datasets import _read  # pylint: disable=g-bad-import-order

RED, WHITE = (200, 30, 10), (255, 255, 255)


def _builder(root, data_dir, size=16, **options):
  return builders.make_builder('image_folder', scheme='auto', image_size=size, data_dir=data_dir,
                               manual_dir=None if root is None else str(root), **options)


def _solid(mode, size, value):
  return Image.new(mode, size, value)


def _noise_png(path, seed, size=(12, 10), mode='RGB'):
  rng = np.random.default_rng(seed)
  shape = (size[1], size[0], 3) if mode == 'RGB' else (size[1], size[0])
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _flat(root, classes=25, per_class=2, seed=0):
  for c in range(classes):
    for i in range(per_class):
      _noise_png(root / f'class{c:02d}' / f'{i}.png', seed * 10000 + c * 100 + i)
  return root


def _nothing_prepared(data_dir):
  """No prepared (or half-prepared) dataset under data_dir: no dataset_info.json, no record file,
  no TFDS incomplete folder."""
  left = [os.path.join(r, f) for r, dirs, files in os.walk(data_dir) for f in files + dirs
          if f == 'dataset_info.json' or 'array_record' in f or f.startswith('incomplete')]
  return not left


# ---------------------------------------------------------------- formats, layouts, statistics


@pytest.fixture(scope='module')
def formats_folder(tmp_path_factory):
  """train/ val/ test/ of class folders; one image per format and mode, sizes mixed (none square but one)."""
  root = tmp_path_factory.mktemp('formats')
  train = root / 'train'
  for name in ('rgb', 'alpha', 'palette', 'deep', 'misc'):
    (train / name).mkdir(parents=True)
  _solid('RGB', (40, 24), RED).save(train / 'rgb' / 'a.png')
  _solid('RGB', (50, 70), RED).save(train / 'rgb' / 'b.jpg', quality=100, subsampling=0)
  _solid('RGB', (9, 13), RED).save(train / 'rgb' / 'c.BMP')
  if features.check('webp'):
    _solid('RGB', (30, 30), RED).save(train / 'rgb' / 'd.webp', lossless=True)
  _solid('RGBA', (20, 31), (0, 0, 0, 0)).save(train / 'alpha' / 'transparent.png')
  _solid('RGBA', (17, 16), (255, 0, 0, 128)).save(train / 'alpha' / 'half.png')
  _solid('LA', (17, 16), (0, 0)).save(train / 'alpha' / 'grey_transparent.png')
  palette = Image.new('P', (21, 11), 1)
  palette.putpalette([*RED, 0, 255, 0] + [0] * 762)
  palette.save(train / 'palette' / 'opaque.gif')
  palette.save(train / 'palette' / 'transparent.png', transparency=1)  # index 1 (green) is transparent
  palette.putpixel((0, 0), 0)
  palette.save(train / 'palette' / 'opaque.png')
  Image.fromarray(np.full((14, 19), 25700, np.uint16)).save(train / 'deep' / 'sixteen.png')  # 'I;16': 100
  Image.fromarray(np.full((14, 19), 65535, np.uint16)).save(train / 'deep' / 'white.png')
  Image.fromarray(np.full((8, 8), 77, np.uint8), 'L').save(train / 'misc' / 'grey.png')
  Image.fromarray(np.zeros((12, 12), bool)).save(train / 'misc' / 'bilevel.png')  # '1', black
  _solid('CMYK', (16, 16), (0, 0, 0, 0)).save(train / 'misc' / 'cmyk.jpg', quality=100)  # white
  (train / 'misc' / 'notes.txt').write_text('not an image')
  (train / 'misc' / '.DS_Store').write_bytes(b'\0\0')
  (train / 'Thumbs.db').write_bytes(b'\0')
  for split, names in (('val', ('v1', 'v2')), ('test', ('t1', 't2', 't3'))):
    for i, name in enumerate(names):
      _noise_png(root / split / name / 'x.png', i, size=(16, 16))
      _noise_png(root / split / name / 'y.jpeg', i + 50, size=(30, 20), mode='L')
  return root


def test_formats_split_layout_and_statistics(formats_folder, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  builder = builders.prepare(_builder(formats_folder, tmp_path))
  data = _read(builder)
  names = builder.info.features['label'].names
  assert names == ['alpha', 'deep', 'misc', 'palette', 'rgb', 'v1', 'v2', 't1', 't2', 't3']  # sorted per split
  for split, labels in (('train', range(5)), ('val', (5, 6)), ('test', (7, 8, 9))):
    images, got = data[split]
    assert sorted(set(got.tolist())) == list(labels)
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
  images, labels = data['train']
  per_class = {names[k]: images[labels == k] for k in range(5)}
  assert len(per_class['rgb']) == (4 if features.check('webp') else 3)
  for image in per_class['rgb']:  # PNG, JPEG, BMP, WebP of one colour, any size
    np.testing.assert_allclose(image.reshape(-1, 3), np.broadcast_to(RED, (256, 3)), atol=3)
  transparent_la, half, transparent = per_class['alpha']  # sorted by file name
  assert (transparent == 255).all() and (transparent_la == 255).all()  # composited over white
  np.testing.assert_allclose(half[0, 0], (255, 127, 127), atol=1)
  np.testing.assert_array_equal(per_class['deep'][0], np.full((16, 16, 3), 100))  # 16-bit: round(v / 257)
  np.testing.assert_array_equal(per_class['deep'][1], np.full((16, 16, 3), 255))
  bilevel, cmyk, grey = per_class['misc']
  assert (bilevel == 0).all() and (grey == 77).all()
  np.testing.assert_allclose(cmyk, 255, atol=2)
  opaque_gif, opaque_png, transparent_png = per_class['palette']
  assert (opaque_gif == (0, 255, 0)).all(axis=-1).all() and (transparent_png == 255).all()
  np.testing.assert_array_equal(opaque_png[-1, -1], (0, 255, 0))
  # Statistics of the stored train images, in the prepared metadata, equal numpy's.
  metadata = builder.info.metadata
  pixels = images.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(metadata['mean'], pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(metadata['std'], pixels.std(0), rtol=1e-9)
  assert metadata['layout'] == 'split' and metadata['skipped'] == 3 and metadata['train_images'] == len(images)
  assert any('3 entries that are not images skipped' in r.getMessage() for r in caplog.records)
  # The class lists beside the prepared data.
  assert (builder.data_path / 'val_classes.txt').read_text() == 'v1\nv2\n'
  # Grey: one channel, ITU-R 601 luma of the same pixels.
  grey = _read(builders.prepare(_builder(formats_folder, tmp_path, channels=1)))
  g_images, g_labels = grey['train']
  assert g_images.shape[1:] == (16, 16, 1) and g_images.dtype == np.uint8
  luma = round((RED[0] * 299 + RED[1] * 587 + RED[2] * 114) / 1000)
  np.testing.assert_allclose(g_images[g_labels == 4], luma, atol=3)
  assert (g_images[g_labels == 1][0] == 100).all()


def test_flat_folder_seeded_split(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  root = _flat(tmp_path / 'flat')
  (root / 'README.md').write_text('my data')
  everything = sorted(p.name for p in root.iterdir() if p.is_dir())
  first = builders.prepare(_builder(root, tmp_path / 'a'))
  classes = first.info.metadata['classes']
  assert [len(classes[s]) for s in sources.SPLITS] == [16, 4, 5]  # 64 / 16 / 20 % of 25
  assert sorted(sum(classes.values(), [])) == everything
  for split in sources.SPLITS:
    assert classes[split] == sorted(classes[split])
    assert (first.data_path / f'{split}_classes.txt').read_text().split() == classes[split]
  data = _read(first)
  names = first.info.features['label'].names
  for split in sources.SPLITS:
    assert sorted({names[k] for k in data[split][1]}) == classes[split]
  assert any('16 / 4 / 5 classes' in r.getMessage() and 'seed 0' in r.getMessage() for r in caplog.records)
  # The same seed gives the same split (the same prepared dataset); another seed or other fractions another.
  again = _builder(root, tmp_path / 'a')
  assert again.is_prepared() and again.builder_config.name == first.builder_config.name
  other = builders.prepare(_builder(root, tmp_path / 'a', split_seed=1))
  assert other.builder_config.name != first.builder_config.name
  assert other.info.metadata['classes'] != classes
  halves = builders.prepare(_builder(root, tmp_path / 'a', split_fractions=(0.5, 0.25, 0.25)))
  assert [len(halves.info.metadata['classes'][s]) for s in sources.SPLITS] == [13, 6, 6]


def test_a_changed_folder_is_prepared_again(tmp_path, monkeypatch):
  root = _flat(tmp_path / 'flat', classes=6, per_class=3)
  first = builders.prepare(_builder(root, tmp_path))
  mean = first.info.metadata['mean']
  (root / 'class00' / 'notes.txt').write_text('not part of the data')  # not an image: same dataset
  same = _builder(root, tmp_path)
  assert same.is_prepared() and same.builder_config.name == first.builder_config.name
  monkeypatch.setattr(image_files.Image, 'open', lambda *a: (_ for _ in ()).throw(AssertionError('decoded')))
  builders.prepare(same)  # read, not decoded again
  monkeypatch.undo()
  train = first.info.metadata['classes']['train'][0]
  _noise_png(root / train / 'new.png', 99)
  added = _builder(root, tmp_path)
  assert not added.is_prepared()
  added = builders.prepare(added)
  assert added.info.metadata['train_images'] == first.info.metadata['train_images'] + 1
  assert added.info.metadata['mean'] != mean
  # Rewritten in place (same name and size, another time stamp): prepared again too.
  stat = os.stat(root / train / 'new.png')
  os.utime(root / train / 'new.png', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert not _builder(root, tmp_path).is_prepared()


# ---------------------------------------------------------------- bad input


def _corrupt_jpeg(root):
  _flat(root, classes=4)
  (root / 'class01' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is no JPEG')
  return root / 'class01' / 'broken.jpg'


def _truncated_jpeg(root):
  _flat(root, classes=4)
  path = root / 'class02' / 'cut.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
  path.write_bytes(path.read_bytes()[:600])
  return path


def _float_tiff(root):
  _flat(root, classes=4)
  path = root / 'class03' / 'float.tif'
  Image.fromarray(np.ones((8, 8), np.float32)).save(path)
  return path


def _empty_class(root):
  _flat(root, classes=4)
  (root / 'empty').mkdir()
  (root / 'empty' / 'notes.txt').write_text('x')
  return root / 'empty'


def _stray_image(root):
  _flat(root, classes=4)
  _noise_png(root / 'stray.png', 1)
  return root / 'stray.png'


def _partial_splits(root):
  for split in ('train', 'test'):
    _flat(root / split, classes=3)
  return 'no val/'


def _shared_class(root):
  for split in sources.SPLITS:
    _noise_png(root / split / f'only_{split}' / 'a.png', 0)
  _noise_png(root / 'test' / 'only_train' / 'b.png', 1)
  return "class 'only_train' is in both train/ and test/"


def _two_classes(root):
  _flat(root, classes=2)
  return '2 class folder'


def _only_files(root):
  root.mkdir()
  (root / 'README.txt').write_text('x')
  return 'holds no class folder'


def _root_is_file(root):
  root.write_text('x')
  return 'is not a folder'


BAD = {
    'missing root': (lambda root: 'does not exist'),
    'root is a file': _root_is_file,
    'empty root': lambda root: (root.mkdir(), 'holds no class folder')[1],
    'only non-image files': _only_files,
    'empty class folder': _empty_class,
    'image outside a class folder': _stray_image,
    'corrupt jpeg': _corrupt_jpeg,
    'truncated jpeg': _truncated_jpeg,
    'floating-point tiff': _float_tiff,
    'partial split folders': _partial_splits,
    'class in two splits': _shared_class,
    'too few classes to split': _two_classes,
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_is_one_error_and_nothing_is_prepared(case, tmp_path):
  root = tmp_path / 'images'
  expected = BAD[case](root)
  with pytest.raises(DataError) as e:  # listing errors come with the builder, decoding errors from prepare
    builders.prepare(_builder(root, tmp_path / 'tfds'))
  message = str(e.value)
  assert '\n' not in message and str(expected) in message, message
  assert _nothing_prepared(tmp_path / 'tfds')


def test_bad_options_and_no_folder(tmp_path):
  root = _flat(tmp_path / 'flat', classes=3)
  for options, needle in (({'channels': 2}, 'data.channels=2'), ({'split_fractions': (0.5, 0.5)}, 'split_fractions'),
                          ({'split_fractions': (0.7, 0.2, 0.2)}, 'summing to 1'), ({'split_seed': -1}, 'split_seed'),
                          ({'size': 4}, 'data.image_size=4'), ({'colour': 1}, 'data.colour')):
    size = options.pop('size', 16)
    with pytest.raises(ConfigError, match=needle):
      _builder(root, tmp_path, size=size, **options)
  with pytest.raises(DataError, match='needs data.manual_dir'):
    builders.prepare(_builder(None, tmp_path / 'none'))
  assert _nothing_prepared(tmp_path / 'none')


def test_class_smaller_than_an_episode(tmp_path):
  """A class with fewer images than shots + queries: the episode check names the numbers and the split."""
  root = _flat(tmp_path / 'flat', classes=10, per_class=3)
  c = load_config('protonet', 'folder-5w1s')
  c.data.manual_dir, c.data.data_dir, c.data.image_size = str(root), str(tmp_path / 'tfds'), 16
  train = input_pipeline.load(c, 'train')
  with pytest.raises(ConfigError, match=r"1 \+ 15 = 16 is larger than the 3 images of the smallest class of split "
                                         r"'train'"):
    check_episode_fits(train, c.episode.ways, c.episode.shots, c.episode.queries, 'train')


def test_a_split_of_one_class_says_what_to_add(tmp_path):
  """3 class folders split 0.64 / 0.16 / 0.2: train gets 1 class, and `use episode.ways <= 1` would be advice
  the next check refuses; the message says what to add instead."""
  root = _flat(tmp_path / 'flat', classes=3, per_class=2)
  c = load_config('protonet', 'folder-5w1s')
  c.data.manual_dir, c.data.data_dir, c.data.image_size = str(root), str(tmp_path / 'tfds'), 16
  train = input_pipeline.load(c, 'train')
  with pytest.raises(ConfigError) as e:
    check_episode_fits(train, 5, 1, 1, 'train')
  message = str(e.value)
  assert message.startswith("episode.ways=5 is larger than the 1 classes of split 'train', and a task needs at "
                            "least 2: add classes to split 'train' (more class folders, or data.split_fractions")
  assert '<= 1' not in message and '\n' not in message


def test_one_way_is_rejected_for_every_preset():
  for path in sorted((REPO / 'configs').glob('*.py')):
    for preset in config_lib.load_module(str(path)).PRESETS:
      c = config_lib.load_file(str(path), preset)
      c.episode.ways = 1
      with pytest.raises(ConfigError, match=r'^episode.ways=1 asks for 1 class; a task needs at least 2'):
        config_lib.validate(c)
  c = load_config('protonet', 'synthetic')
  c.episode.train_ways = 1
  with pytest.raises(ConfigError, match='episode.train_ways=1'):
    config_lib.validate(c)


def test_launch_prints_one_line_and_exits_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  broken = _corrupt_jpeg(tmp_path / 'images')
  for flags, needle in (
      (['--config=configs/protonet.py:synthetic', '--config.episode.ways=1'], 'error: episode.ways=1 asks for 1 class; a task needs at least 2'),
      (['--config=configs/protonet.py:folder-5w1s', f'--config.data.manual_dir={tmp_path / "images"}'],
       f'error: cannot decode image {broken}')):
    run = subprocess.run([sys.executable, 'launch.py', *flags, f'--workdir={tmp_path / "work"}',
                          f'--config.data.data_dir={tmp_path / "tfds"}'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and errors[0].startswith(needle), run.stderr[-2000:]
  assert _nothing_prepared(tmp_path / 'tfds') and not (tmp_path / 'work').exists()


# ---------------------------------------------------------------- presets and training


@pytest.mark.parametrize('method', ['protonet', 'matchingnet', 'lgmnet'])
def test_folder_presets_need_only_the_path(method, tmp_path):
  root = _flat(tmp_path / 'flat', classes=6, per_class=3)
  for preset, shots in (('folder-5w1s', 1), ('folder-5w5s', 5)):
    c = config_lib.validate(load_config(method, preset))
    assert c.data.name == 'image_folder' and c.data.manual_dir is None
    assert (c.episode.ways, c.episode.shots) == (5, shots) and c.data.mean == c.data.std == ()
    assert input_pipeline.input_shape(c) == (84, 84, 3)
  c.data.manual_dir, c.data.data_dir, c.data.image_size, c.data.channels = str(root), str(tmp_path), 16, 1
  assert input_pipeline.input_shape(c) == (16, 16, 1)
  filled = input_pipeline.with_statistics(c)  # prepares the folder; data.mean / std from its metadata
  metadata = input_pipeline.builder_from_config(c).info.metadata
  assert filled.data.mean == tuple(metadata['mean']) and filled.data.std == tuple(metadata['std'])
  assert len(filled.data.mean) == 1 and c.data.mean == ()


def test_idemenet_command_of_the_docs_validates():
  """docs/datasets.md: IDeMe-Net has no folder preset; its documented command is a valid config."""
  for preset in ('cub-pretrain', 'cub-5w1s'):
    c = load_config('idemenet', preset)
    c.data.update(name='image_folder', split='auto', manual_dir='/my/images')
    c.method.num_classes = 38
    config_lib.validate(c)
    c.data.channels = 1  # (in a config file: a grey folder)
    with pytest.raises(ConfigError, match="IDeMe-Net runs on RGB datasets; data.name='image_folder' has 1 channel"):
      config_lib.validate(c)


def _omniglot_folder(root, characters=60):
  """The first `characters` Omniglot background characters, 20 drawers each, as 105x105 bilevel PNGs
  (True = white paper), one class folder per character."""
  images = np.load(DATA / 'omniglot' / 'images_background.npz')['images'][:characters]
  for c, drawings in enumerate(images):
    folder = root / f'character{c:03d}'
    folder.mkdir(parents=True)
    for d, image in enumerate(drawings):
      Image.fromarray(image).save(folder / f'{d:02d}.png')
  return root


@pytest.mark.skipif(not (DATA / 'omniglot' / 'images_background.npz').exists(), reason='no FEWSHOT_DATA_DIR')
def test_protonet_learns_on_an_image_folder(tmp_path):
  """launch.py with the folder preset and the path (plus a CPU-sized schedule): 60 characters split
  38 / 10 / 12 by class, 28x28 grey; validation and test accuracy well above the 20% of 5-way chance."""
  root = _omniglot_folder(tmp_path / 'characters')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TQDM_DISABLE='1')
  small = ['--config.data.image_size=28', '--config.data.channels=1', '--config.episode.train_ways=20',
           '--config.episode.queries=5', '--config.train.steps=60', '--config.train.eval_every=60',
           '--config.train.log_every=30', '--config.train.steps_per_call=30', '--config.train.checkpoint_every=60',
           '--config.eval.val_episodes=60', '--config.eval.episodes=120']
  run = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/protonet.py:folder-5w1s', f'--config.data.manual_dir={root}',
       f'--workdir={tmp_path / "work"}', f'--config.data.data_dir={tmp_path / "tfds"}', *small],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  test = json.loads(run.stdout.strip().splitlines()[-1])
  val = [float(line.split('validation accuracy ')[1].split('%')[0]) for line in run.stderr.splitlines()
         if 'validation accuracy' in line]
  assert test['dataset'] == 'image_folder' and test['accuracy'] > 50.0, test
  assert val and val[-1] > 50.0, val
  saved = json.loads((tmp_path / 'work' / 'config.json').read_text())
  assert len(saved['data']['mean']) == 1 and saved['data']['mean'][0] > 200  # white paper, from the folder
