"""TFDS builders on the real shared data, on tiny fake manual dirs, and their errors.

Real data: $FEWSHOT_DATA_DIR (default <repo>/../shared/data). Each real dataset is
prepared once per module into a temporary data_dir.
"""

import io
import os
import pathlib
import shutil
import tarfile
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from fewshot_jax.data import mini_imagenet, omniglot, registry, synthetic
from fewshot_jax.data.builders import make_builder, prepare
from fewshot_jax.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get('FEWSHOT_DATA_DIR', REPO.parent / 'shared' / 'data'))
SPLITS = ('train', 'val', 'test')

needs_data = pytest.mark.skipif(
    not ((DATA / 'omniglot').is_dir() and (DATA / 'miniimagenet').is_dir()),
    reason=f'no real data in {DATA} (set FEWSHOT_DATA_DIR)')


def load_split(source, with_images=True, chunk=8192):
  """(images [N, ...] or None, labels [N]) of a whole data source."""
  images, labels = [], []
  for start in range(0, len(source), chunk):
    batch = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
    labels.extend(int(e['label']) for e in batch)
    if with_images:
      images.extend(e['image'] for e in batch)
  return (np.stack(images) if with_images else None), np.array(labels)


def class_counts(labels):
  values, counts = np.unique(labels, return_counts=True)
  return dict(zip(values.tolist(), counts.tolist()))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _prepared(name, scheme, size, tfds_dir, manual):
  return prepare(make_builder(name, scheme=scheme, image_size=size, data_dir=tfds_dir, manual_dir=manual))


@pytest.fixture(scope='module')
def vinyals(tfds_dir):
  builder = _prepared('omniglot', 'vinyals', 28, tfds_dir, DATA / 'omniglot')
  source = builder.as_data_source()
  return builder, {split: load_split(source[split]) for split in SPLITS}


@pytest.fixture(scope='module')
def lake(tfds_dir):
  builder = _prepared('omniglot', 'lake', 28, tfds_dir, DATA / 'omniglot')
  source = builder.as_data_source()
  return builder, {split: load_split(source[split], with_images=False)[1] for split in SPLITS}


@pytest.fixture(scope='module')
def mini(tfds_dir):
  return _prepared('mini_imagenet', 'ravi', 84, tfds_dir, DATA / 'miniimagenet')


# ---------------------------------------------------------------- Omniglot, real data


@needs_data
def test_vinyals_class_counts_and_disjoint_labels(vinyals):
  builder, data = vinyals
  expected = {'train': 4112, 'val': 688, 'test': 1692}
  assert registry.get('omniglot').base_classes == expected['train']
  label_sets = {}
  for split, num_classes in expected.items():
    images, labels = data[split]
    counts = class_counts(labels)
    assert len(counts) == num_classes and set(counts.values()) == {20}
    assert images.shape == (num_classes * 20, 28, 28, 1) and images.dtype == np.uint8
    label_sets[split] = set(counts)
  assert not label_sets['train'] & label_sets['test']
  assert not label_sets['train'] & label_sets['val'] and not label_sets['val'] & label_sets['test']
  # No character (any rotation) of test appears in train.
  names = builder.info.features['label'].names
  character = lambda label: names[label].rsplit('/', 1)[0]
  assert not {character(l) for l in label_sets['train']} & {character(l) for l in label_sets['test']}


@needs_data
def test_vinyals_rotations_are_rot90_of_rot000(vinyals):
  builder, data = vinyals
  images, labels = data['train']
  label_of = {n: i for i, n in enumerate(builder.info.features['label'].names)}
  base_name = 'Korean/character07/rot000'
  base = images[labels == label_of[base_name]][..., 0]
  assert base.shape == (20, 28, 28)
  for degrees in (90, 180, 270):
    rotated = images[labels == label_of[base_name.replace('rot000', f'rot{degrees:03d}')]][..., 0]
    np.testing.assert_array_equal(rotated, np.rot90(base, degrees // 90, axes=(1, 2)))


@needs_data
def test_vinyals_images_match_npz_and_polarity(vinyals):
  builder, data = vinyals
  names = builder.info.features['label'].names
  alphabets = {a.name: a for a in omniglot.read_alphabets(DATA / 'omniglot')}
  for split in ('train', 'test'):  # Angelic/character01/rot000, Gurmukhi/character42/rot000
    images, labels = data[split]
    alphabet, character, rotation = names[labels[0]].split('/')
    # README: official number = first id + NN - 1 = npz label + 1 (background) or + 965.
    number = alphabets[alphabet].first_id + int(character.removeprefix('character')) - 1
    set_name = alphabets[alphabet].set_name
    with np.load(DATA / 'omniglot' / f'images_{set_name}.npz') as npz:
      row = number - (1 if set_name == 'background' else 965)
      assert npz['labels'][row, 0] == row
      ink = ~npz['images'][row]
    expected = np.rot90(omniglot.resize_ink(ink, 28), int(rotation[3:]) // 90, axes=(1, 2))
    np.testing.assert_array_equal(images[:20, ..., 0], expected)
    ink_fraction = (images > 127).mean()
    assert 0.01 < ink_fraction < 0.3  # Ink is 255 on a 0 background.
    assert images[:, 0, 0, 0].mean() < 5  # Corners are paper.


@needs_data
def test_lake_covers_all_characters(lake):
  builder, labels = lake
  names = builder.info.features['label'].names
  assert sum(len(l) for l in labels.values()) == 1623 * 20
  per_split = {split: class_counts(l) for split, l in labels.items()}
  assert all(set(c.values()) == {20} for c in per_split.values())
  assert sum(len(c) for c in per_split.values()) == 1623 == len(names)
  alphabets = omniglot.read_alphabets(DATA / 'omniglot')
  alphabet_of = lambda split: {names[l].split('/')[0] for l in per_split[split]}
  background = [a.name for a in alphabets if a.set_name == 'background']
  assert alphabet_of('val') == set(background[-5:])
  assert alphabet_of('train') == set(background[:-5])
  assert alphabet_of('test') == {a.name for a in alphabets if a.set_name == 'evaluation'}


@needs_data
def test_second_prepare_is_a_no_op(vinyals, tfds_dir):
  builder, _ = vinyals
  data_path = pathlib.Path(os.fspath(builder.data_path))
  assert data_path.parent.parent.name == 'fewshot_omniglot'
  mtime = data_path.stat().st_mtime_ns
  start = time.perf_counter()
  prepare(builder)
  prepare(make_builder('omniglot', scheme='vinyals', image_size=28, data_dir=tfds_dir,
                       manual_dir=DATA / 'omniglot'))
  assert time.perf_counter() - start < 1.0
  assert data_path.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- Omniglot, official zip layout

_FAKE_ALPHABETS = {'background': ('Arcadian', 1, 26), 'evaluation': ('Angelic', 965, 984)}


@pytest.fixture(scope='module')
def fake_omniglot_zips(tmp_path_factory):
  """Official-layout zips for one background + one evaluation alphabet, from the real npz."""
  manual = tmp_path_factory.mktemp('omniglot_zip_manual')
  lines = ['split,alphabet,first_character_id,last_character_id']
  for set_name, (alphabet, first, last) in _FAKE_ALPHABETS.items():
    lines.append(f'{set_name},{alphabet},{first},{last}')
    with np.load(DATA / 'omniglot' / f'images_{set_name}.npz') as npz:
      paper = npz['images'][:last - first + 1]
    with zipfile.ZipFile(manual / f'images_{set_name}.zip', 'w') as archive:
      for c, drawings in enumerate(paper):
        for d, image in enumerate(drawings):
          png = io.BytesIO()
          Image.fromarray(image).save(png, format='PNG')  # bool -> 1-bit, white paper
          archive.writestr(f'images_{set_name}/{alphabet}/character{c + 1:02d}/'
                           f'{first + c:04d}_{d + 1:02d}.png', png.getvalue())
  (manual / 'alphabets.csv').write_text('\n'.join(lines) + '\n')
  splits = manual / 'splits' / 'vinyals'
  splits.mkdir(parents=True)
  (splits / 'train.txt').write_text('Arcadian/character01/rot000\nArcadian/character01/rot090\n'
                                    'Arcadian/character26/rot000\n')
  (splits / 'val.txt').write_text('Angelic/character02/rot000\n')
  (splits / 'test.txt').write_text('Angelic/character20/rot270\n')
  return manual


@needs_data
def test_zip_reader_matches_npz(fake_omniglot_zips):
  alphabets = omniglot.read_alphabets(DATA / 'omniglot')
  for set_name, (alphabet, first, last) in _FAKE_ALPHABETS.items():
    from_zip = omniglot.read_zip(fake_omniglot_zips / f'images_{set_name}.zip')
    from_npz = omniglot.read_npz(DATA / 'omniglot' / f'images_{set_name}.npz', set_name, alphabets)
    assert set(from_zip) == {(alphabet, c) for c in range(1, last - first + 2)}
    for key, ink in from_zip.items():
      np.testing.assert_array_equal(ink, from_npz[key])


@needs_data
def test_omniglot_builder_from_zips(fake_omniglot_zips, tmp_path):
  builder = _prepared('omniglot', 'vinyals', 28, tmp_path, fake_omniglot_zips)
  names = builder.info.features['label'].names
  assert names == ['Arcadian/character01/rot000', 'Arcadian/character01/rot090',
                   'Arcadian/character26/rot000', 'Angelic/character02/rot000',
                   'Angelic/character20/rot270']
  source = builder.as_data_source()
  images, labels = load_split(source['test'])
  assert labels.tolist() == [4] * 20
  with np.load(DATA / 'omniglot' / 'images_evaluation.npz') as npz:
    ink = ~npz['images'][19]
  np.testing.assert_array_equal(images[..., 0], np.rot90(omniglot.resize_ink(ink, 28), 3, axes=(1, 2)))
  assert class_counts(load_split(source['train'], with_images=False)[1]) == {0: 20, 1: 20, 2: 20}


# ---------------------------------------------------------------- Omniglot, errors


def test_missing_omniglot_manual_dir_without_network(tmp_path, monkeypatch):
  def no_network(url, timeout=10.0):
    raise OSError(f'network disabled in this test ({url})')
  monkeypatch.setattr(omniglot, '_check_reachable', no_network)
  missing = tmp_path / 'no_such_manual_dir'
  builder = make_builder('omniglot', scheme='lake', image_size=28, data_dir=tmp_path / 'tfds',
                         manual_dir=missing)
  with pytest.raises(DataError) as info:
    prepare(builder)
  message = str(info.value)
  assert str(missing) in message and 'images_background.npz' in message and 'zip' in message


@needs_data
def test_incomplete_omniglot_manual_dir(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  shutil.copy(DATA / 'omniglot' / 'images_background.npz', manual)
  builder = make_builder('omniglot', scheme='vinyals', image_size=28, data_dir=tmp_path / 'tfds',
                         manual_dir=manual)
  with pytest.raises(DataError) as info:
    prepare(builder)
  assert str(manual) in str(info.value) and 'images_evaluation.npz' in str(info.value)


# ---------------------------------------------------------------- miniImageNet, real data


@needs_data
def test_mini_imagenet_real(mini):
  source = mini.as_data_source()
  expected = {'train': range(0, 64), 'val': range(64, 80), 'test': range(80, 100)}
  assert registry.get('mini_imagenet').base_classes == len(expected['train'])
  for split, label_range in expected.items():
    _, labels = load_split(source[split], with_images=False)
    counts = class_counts(labels)
    assert sorted(counts) == list(label_range) and set(counts.values()) == {600}
  first = source['train'][0]
  assert first['image'].shape == (84, 84, 3) and first['image'].dtype == np.uint8
  filename, wnid = mini_imagenet.read_split_csv(DATA / 'miniimagenet' / 'train.csv')[0]
  assert mini.info.features['label'].names[first['label']] == wnid and first['label'] == 0
  with tarfile.open(DATA / 'miniimagenet' / 'images.tar') as archive:
    data = archive.extractfile(f'images/{filename}').read()
  np.testing.assert_array_equal(first['image'], np.asarray(Image.open(io.BytesIO(data)).convert('RGB')))


# ---------------------------------------------------------------- miniImageNet, fake manual dirs


def _fake_mini(root: pathlib.Path, layout: str) -> pathlib.Path:
  """3 classes x 4 JPEGs per split (one image 100x90 to exercise resizing)."""
  rng = np.random.default_rng(0)
  (root / 'images').mkdir(parents=True)
  for s, split in enumerate(SPLITS):
    rows = ['filename,label']
    for c in range(3):
      wnid = f'n{s}{c:07d}'
      for i in range(4):
        name = f'{wnid}{i:08d}.jpg'
        shape = (90, 100, 3) if (s, c, i) == (0, 1, 2) else (84, 84, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / 'images' / name)
        rows.append(f'{name},{wnid}')
    (root / f'{split}.csv').write_text('\n'.join(rows) + '\n')
  if layout == 'tar':
    with tarfile.open(root / 'images.tar', 'w') as archive:
      archive.add(root / 'images', arcname='images')
    shutil.rmtree(root / 'images')
  return root


def test_mini_imagenet_folder_and_tar_layouts_agree(tmp_path):
  arrays = {}
  for layout in ('folder', 'tar'):
    manual = _fake_mini(tmp_path / layout, layout)
    builder = _prepared('mini_imagenet', 'ravi', 84, tmp_path / f'tfds_{layout}', manual)
    source = builder.as_data_source()
    arrays[layout] = {split: load_split(source[split]) for split in SPLITS}
  for split, (images, labels) in arrays['folder'].items():
    assert images.shape == (12, 84, 84, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == [3 * SPLITS.index(split) + c for c in range(3)]
    np.testing.assert_array_equal(images, arrays['tar'][split][0])
    np.testing.assert_array_equal(labels, arrays['tar'][split][1])


def test_mini_imagenet_corrupt_jpeg(tmp_path):
  manual = _fake_mini(tmp_path / 'manual', 'folder')
  corrupt = manual / 'images' / 'n1000000200000001.jpg'
  corrupt.write_bytes(b'\xff\xd8 this is not a JPEG')
  builder = make_builder('mini_imagenet', scheme='ravi', image_size=84, data_dir=tmp_path / 'tfds',
                         manual_dir=manual)
  with pytest.raises(DataError, match='cannot decode') as info:
    prepare(builder)
  assert str(corrupt) in str(info.value)


def test_mini_imagenet_missing_files(tmp_path):
  builder = make_builder('mini_imagenet', scheme='ravi', image_size=84, data_dir=tmp_path / 'tfds',
                         manual_dir=tmp_path / 'absent')
  with pytest.raises(DataError, match='absent'):
    prepare(builder)
  manual = _fake_mini(tmp_path / 'manual', 'tar')
  (manual / 'val.csv').unlink()
  with pytest.raises(DataError, match='val.csv'):
    prepare(make_builder('mini_imagenet', scheme='ravi', image_size=84, data_dir=tmp_path / 'tfds2',
                         manual_dir=manual))
  manual = _fake_mini(tmp_path / 'manual_folder', 'folder')
  (manual / 'images' / 'n2000000100000003.jpg').unlink()
  with pytest.raises(DataError, match='n2000000100000003.jpg'):
    prepare(make_builder('mini_imagenet', scheme='ravi', image_size=84, data_dir=tmp_path / 'tfds3',
                         manual_dir=manual))


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize('name, scheme, size, bad', [
    ('cifar', 'default', 32, 'cifar'),
    ('omniglot', 'ravi', 28, 'ravi'),
    ('omniglot', 'vinyals', 0, '0'),
    ('mini_imagenet', 'vinyals', 84, 'vinyals'),
    ('mini_imagenet', 'ravi', 32, '32'),
    ('synthetic', 'lake', 28, 'lake'),
    ('synthetic', 'default', 84, '84'),
])
def test_config_errors_name_the_bad_value(name, scheme, size, bad, tmp_path):
  with pytest.raises(ConfigError, match=bad):
    make_builder(name, scheme=scheme, image_size=size, data_dir=tmp_path)


# ---------------------------------------------------------------- synthetic


def test_synthetic_counts_and_determinism(tmp_path):
  builder = _prepared('synthetic', 'default', 28, tmp_path, None)
  source = builder.as_data_source()
  offset = 0
  for split, num_classes in synthetic.SPLIT_CLASSES.items():
    images, labels = load_split(source[split])
    assert images.shape == (num_classes * 20, 28, 28, 1) and images.dtype == np.uint8
    assert class_counts(labels) == {offset + c: 20 for c in range(num_classes)}
    offset += num_classes
  # Stored data equals a fresh generation from the seed; another seed differs.
  np.testing.assert_array_equal(images[:20, ..., 0], synthetic.class_images(0, 250))
  assert not np.array_equal(synthetic.class_images(1, 250), synthetic.class_images(0, 250))
  assert 0.02 < (images > 127).mean() < 0.3
