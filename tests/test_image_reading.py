"""One reading of an image file per dataset record: for every record, files a reading can get wrong
(format_fixtures.KINDS: RGBA and palette transparency, 16-bit grey, EXIF orientation 6, CMYK, grey
among colour) are written in the record's real on-disk format, prepared by its builder, and each file
read by prediction (api.Model.read_images) must equal, bit for bit, the array the builder stored for
THAT file (matched by the order the builder writes: its listing, CSV, images.txt or pickle order).

cifar_fs / fc100 store pickled pixel arrays and synthetic generates its images: no file is decoded
there, so a PNG of a stored image must read back as that image. benchmarks/image_reading.py prints the
counts per record and kind.
"""

import collections
import csv
import io
import tarfile
import types
import zipfile

import numpy as np
import pytest
from PIL import Image

from fewshot_jax import api, methods
from fewshot_jax.data import cub, input_pipeline, sources, synthetic
from tests import format_fixtures as ff
from tests.conftest import load_config

PRESETS = {'image_folder': 'folder-5w1s', 'mini_imagenet': 'mini-5w1s', 'cub': 'cub-5w1s',
           'tiered_imagenet': 'tiered-5w1s', 'omniglot': 'omniglot-5w1s', 'cifar_fs': 'cifarfs-5w1s',
           'synthetic': 'synthetic'}


def model_for(name: str, data_dir, **data) -> api.Model:
  """A Model of `name`'s preset (untrained: reading files needs no parameters) with data.* overrides."""
  c = load_config('protonet', PRESETS[name])
  c.data.data_dir = str(data_dir)
  c.data.update(data)
  return api.Model(c, methods.build(c), types.SimpleNamespace(params=None, model_state=None, step=0))


def _stored(model: api.Model) -> dict:
  """{split: uint8 images in the order the builder wrote them}."""
  source = input_pipeline.builder_from_config(model.config).as_data_source()
  return {split: np.stack([e['image'] for e in source[split]]) for split in sources.SPLITS}


def _write(folder, i: int, ext: str, data: bytes) -> str:
  """A user's copy of a file the builder read from an archive or a pickle."""
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{i:04d}{ext}'
  path.write_bytes(data)
  return str(path)


# ---------------------------------------------------------------- each record's files


def image_folder_files(root, channels=3):
  """train/ (2 classes) val/ test/ (1 each), every kind in every class; (model, [(kind, split, i, path)])."""
  for split, classes in (('train', ('a', 'b')), ('val', ('c',)), ('test', ('d',))):
    for c, name in enumerate(classes):
      for k, kind in enumerate(ff.KINDS):
        ext, data = ff.adversarial(kind, 100 * c + k)
        (root / 'images' / split / name).mkdir(parents=True, exist_ok=True)
        (root / 'images' / split / name / f'{kind}{ext}').write_bytes(data)
  model = model_for('image_folder', root / 'tfds', manual_dir=str(root / 'images'), image_size=16,
                    channels=channels)
  listing = input_pipeline.builder_from_config(model.config).listing
  files = []
  for split in sources.SPLITS:
    paths = [p for _, class_paths in listing.classes[split] for p in class_paths]  # the builder's row order
    files += [(p.rsplit('/', 1)[1].split('.')[0], split, i, p) for i, p in enumerate(paths)]
  return model, files


def mini_imagenet_files(root):
  """images.tar + train/val/test.csv, 2 / 1 / 1 classes of every kind (100x90: resized, Lanczos)."""
  files, members = [], {}
  (root / 'manual').mkdir()
  for s, split in enumerate(sources.SPLITS):
    rows = [('filename', 'label')]
    for c in range(2 if split == 'train' else 1):
      for k, kind in enumerate(ff.KINDS):
        ext, data = ff.adversarial(kind, 10 * s + c + 100 * k, (100, 90))
        name = f'n{s}{c:07d}{k:08d}{ext}'
        members[name] = data
        files.append((kind, split, len(rows) - 1, _write(root / 'user', len(files), ext, data)))
        rows.append((name, f'n{s}{c:07d}'))
    with open(root / 'manual' / f'{split}.csv', 'w', newline='') as f:
      csv.writer(f).writerows(rows)
  with tarfile.open(root / 'manual' / 'images.tar', 'w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(f'images/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return model_for('mini_imagenet', root / 'tfds', manual_dir=str(root / 'manual')), files


def cub_files(root):
  """CUB_200_2011/ with every image (one per class) an adversarial file, images.txt naming it."""
  encode = lambda i: ff.adversarial(ff.KINDS[i % len(ff.KINDS)], i, (100, 90))
  ff.write_cub(root / 'manual', per_class=1, encode=encode)
  folder = root / 'manual' / cub.FOLDER
  texts = {n: (folder / n).read_text() for n in cub.META_FILES}
  per_split = cub.read_metadata(texts, {n: n for n in cub.META_FILES})  # the builder's order
  order = {rel: i for i, rel in enumerate(line.split()[1] for line in texts['images.txt'].splitlines())}
  files = [(ff.KINDS[order[rel] % len(ff.KINDS)], split, i, str(folder / 'images' / rel))
           for split in sources.SPLITS for i, (rel, _) in enumerate(per_split[split])]
  return model_for('cub', root / 'tfds', manual_dir=str(root / 'manual')), files


def tiered_imagenet_files(root):
  """The authors' pickles, every item an adversarial file (one per class, pickle order)."""
  encode = lambda i: ff.adversarial(ff.KINDS[i % len(ff.KINDS)], i, (100, 90))
  ff.write_tiered_pickles(root / 'manual', encode=encode)
  files, count = [], 0
  for split in sources.SPLITS:
    for i in range(len(sources.class_list('tiered_imagenet', split))):
      kind = ff.KINDS[count % len(ff.KINDS)]
      files.append((kind, split, i, _write(root / 'user', count, *encode(count))))
      count += 1
  return model_for('tiered_imagenet', root / 'tfds', manual_dir=str(root / 'manual')), files


def omniglot_files(root):
  """images_background.zip / images_evaluation.zip of 105x105 scans (members named .png, as the zips'),
  a 2-alphabet alphabets.csv and vinyals lists (train 2, val 1, test 2 characters) in manual_dir."""
  manual = root / 'manual'
  (manual / 'splits' / 'vinyals').mkdir(parents=True)
  (manual / 'alphabets.csv').write_text('split,alphabet,first_character_id,last_character_id\n'
                                        'background,Alpha,1,3\nevaluation,Beta,4,5\n')
  lists = {'train': ('Alpha', 1, 2), 'val': ('Alpha', 3), 'test': ('Beta', 1, 2)}
  for split, (alphabet, *chars) in lists.items():
    (manual / 'splits' / 'vinyals' / f'{split}.txt').write_text(
        ''.join(f'{alphabet}/character{c:02d}/rot000\n' for c in chars))
  files = []
  for set_name, alphabet, chars in (('background', 'Alpha', (1, 2, 3)), ('evaluation', 'Beta', (1, 2))):
    with zipfile.ZipFile(manual / f'images_{set_name}.zip', 'w') as archive:
      for c in chars:
        for drawer in range(1, 21):
          kind = ff.KINDS[(c + drawer) % len(ff.KINDS)]
          ext, data = ff.adversarial(kind, 1000 * c + drawer, (105, 105))
          archive.writestr(f'images_{set_name}/{alphabet}/character{c:02d}/{c:04d}_{drawer:02d}.png', data)
          split = next(s for s, (a, *cs) in lists.items() if a == alphabet and c in cs)
          index = lists[split][1:].index(c) * 20 + drawer - 1  # label * 20 + drawer, per split
          files.append((kind, split, index, _write(root / 'user', len(files), ext, data)))
  return model_for('omniglot', root / 'tfds', manual_dir=str(manual)), files


def cifar_fs_files(root):
  """cifar-100-python.tar.gz; the builder decodes no file: PNGs of its first stored train images."""
  ff.write_cifar100(root / 'manual', per_class=(1, 1))
  model = model_for('cifar_fs', root / 'tfds', manual_dir=str(root / 'manual'))
  stored = _stored(model)['train'][:12]
  return model, [('png of a stored image', 'train', i, _png(root / 'user', i, image)) for i, image in enumerate(stored)]


def synthetic_files(root):
  """Generated: PNGs of the generator's images of 3 train classes (what the builder stores)."""
  model = model_for('synthetic', root / 'tfds')
  images = np.concatenate([synthetic.class_images(0, label)[:4] for label in range(3)])
  index = [label * synthetic.IMAGES_PER_CLASS + i for label in range(3) for i in range(4)]
  return model, [('png of a stored image', 'train', j, _png(root / 'user', j, image))
                 for j, image in zip(index, images)]


def _png(folder, i: int, image: np.ndarray) -> str:
  encoded = ff._png(image[..., 0] if image.shape[-1] == 1 else image)  # pylint: disable=protected-access
  return _write(folder, i, '.png', encoded)


FILES = {'image_folder': image_folder_files, 'image_folder grey': lambda root: image_folder_files(root, 1),
         'mini_imagenet': mini_imagenet_files, 'cub': cub_files, 'tiered_imagenet': tiered_imagenet_files,
         'omniglot': omniglot_files, 'cifar_fs': cifar_fs_files, 'synthetic': synthetic_files}


def matches(record: str, root) -> dict:
  """{kind: (files whose prediction read equals their stored array bit for bit, files)} of `record`."""
  model, files = FILES[record](root)
  stored = _stored(model) if record != 'synthetic' else {'train': np.concatenate(
      [synthetic.class_images(0, label) for label in range(3)])[..., None]}
  read = model.read_images([path for _, _, _, path in files])
  counts = collections.defaultdict(lambda: [0, 0])
  for (kind, split, index, _), got in zip(files, read):
    counts[kind][0] += int(np.array_equal(got, stored[split][index]))
    counts[kind][1] += 1
  return {kind: tuple(c) for kind, c in counts.items()}


@pytest.mark.parametrize('record', list(FILES))
def test_prediction_reads_every_file_as_its_builder_stored_it(record, tmp_path):
  counts = matches(record, tmp_path)
  print(record, counts)
  kinds = ('png of a stored image',) if record in ('cifar_fs', 'synthetic') else ff.KINDS
  assert sorted(counts) == sorted(kinds)
  assert all(matched == total for matched, total in counts.values()), counts


def test_the_reading_of_each_kind():
  """image_files.read at a file's own size: what each kind becomes (the rule every record reads with)."""
  from fewshot_jax.data import image_files  # pylint: disable=import-outside-toplevel
  read = lambda kind, channels=3: image_files.read(ff.adversarial(kind, 7)[1], kind, None, channels)
  base = ff.tiered_image(7, 70)[:50, :70].astype(int)
  rgba = read('rgba')
  assert (rgba[:, :23] == 255).all()  # fully transparent: white background, not the dark pixels under it
  np.testing.assert_array_equal(rgba[:, 47:], base[:, 47:] // 4)
  np.testing.assert_array_equal(rgba[:, 23:46], (base[:, 23:46] // 4 * 128 + 255 * 127 + 127) // 255)
  assert (read('palette')[:25, :35] == 255).all()  # the transparent index
  sixteen = read('sixteen', 1)[:, :, 0]
  assert sixteen[0, :4].tolist() == [100, 255, 0, 0]  # round(v / 257), not clipped to 255
  exif = read('exif')
  assert exif.shape == (50, 70, 3) and np.abs(exif - base).mean() < 8  # turned upright, as a viewer shows it
  assert np.abs(read("cmyk") - base).mean() < 8
  grey = read('grey')
  assert (grey == grey[..., :1]).all()  # grey in an RGB folder: the channel repeated
  with pytest.raises(image_files.DataError, match=r'cannot decode x\.png: '):
    image_files.read(b'\x89PNG broken', 'x.png', 8, 3)
