"""Tiny copies of CIFAR-100, tieredImageNet and CUB-200-2011 in the exact on-disk formats
of their real distributions (no real copy is on this machine). Every class of every
packaged split list is present, with `per_class` small images each.

* CIFAR-100 python: pickles `train` / `test` (dict: data uint8 [N, 3072] as R, G, B
  planes, fine_labels, coarse_labels, filenames, batch_label) and `meta`
  (fine_label_names, coarse_label_names: the real 100 / 20 names, alphabetical),
  in `cifar-100-python/` or `cifar-100-python.tar.gz`.
* tieredImageNet (Ren et al.): `{split}_images_png.pkl`, a pickled list of PNG
  bytes as uint8 arrays [n, 1] (cv2.imencode's output), and `{split}_labels.pkl`,
  a dict of label_specific / label_general (int arrays) and their *_str lists.
* CUB_200_2011: images/<class>/<file>.jpg, images.txt, image_class_labels.txt,
  classes.txt, train_test_split.txt; or CUB_200_2011.tgz.

`adversarial` encodes the files a reading can get wrong (transparency, palette transparency, 16 bits,
EXIF orientation, CMYK, grey among colour); the writers take it as `encode` to hold such files.
"""

import io
import pathlib
import pickle
import tarfile

import numpy as np
from PIL import Image

from fewshot_jax.data import sources

CIFAR100_FINE = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_SUPERCLASSES = {
    'aquatic_mammals': 'beaver dolphin otter seal whale', 'fish': 'aquarium_fish flatfish ray shark trout',
    'flowers': 'orchid poppy rose sunflower tulip', 'food_containers': 'bottle bowl can cup plate',
    'fruit_and_vegetables': 'apple mushroom orange pear sweet_pepper',
    'household_electrical_devices': 'clock keyboard lamp telephone television',
    'household_furniture': 'bed chair couch table wardrobe', 'insects': 'bee beetle butterfly caterpillar cockroach',
    'large_carnivores': 'bear leopard lion tiger wolf',
    'large_man-made_outdoor_things': 'bridge castle house road skyscraper',
    'large_natural_outdoor_scenes': 'cloud forest mountain plain sea',
    'large_omnivores_and_herbivores': 'camel cattle chimpanzee elephant kangaroo',
    'medium_mammals': 'fox porcupine possum raccoon skunk', 'non-insect_invertebrates': 'crab lobster snail spider worm',
    'people': 'baby boy girl man woman', 'reptiles': 'crocodile dinosaur lizard snake turtle',
    'small_mammals': 'hamster mouse rabbit shrew squirrel', 'trees': 'maple_tree oak_tree palm_tree pine_tree willow_tree',
    'vehicles_1': 'bicycle bus motorcycle pickup_truck train', 'vehicles_2': 'lawn_mower rocket streetcar tank tractor'}
CIFAR100_COARSE = list(CIFAR100_SUPERCLASSES)
COARSE_OF = {CIFAR100_FINE.index(f): CIFAR100_COARSE.index(c)
             for c, fs in CIFAR100_SUPERCLASSES.items() for f in fs.split()}


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG', compress_level=1)
  return out.getvalue()


def write_cifar100(root: pathlib.Path, per_class=(2, 1), layout='tar', seed=0) -> pathlib.Path:
  """per_class = (images in the train file, in the test file) of every class."""
  rng = np.random.default_rng(seed)
  folder = root / 'cifar-100-python'
  folder.mkdir(parents=True)
  for name, count in zip(('train', 'test'), per_class):
    fine = np.repeat(np.arange(100), count)
    rng.shuffle(fine)  # the real files are not in class order
    content = {'filenames': [f'img_{i}.png' for i in range(len(fine))], 'batch_label': f'{name} batch 1 of 1',
               'fine_labels': fine.tolist(), 'coarse_labels': [COARSE_OF[f] for f in fine],
               'data': rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)}
    (folder / name).write_bytes(pickle.dumps(content, protocol=2))
  meta = {'fine_label_names': CIFAR100_FINE, 'coarse_label_names': CIFAR100_COARSE}
  (folder / 'meta').write_bytes(pickle.dumps(meta, protocol=2))
  if layout == 'tar':
    with tarfile.open(root / 'cifar-100-python.tar.gz', 'w:gz') as tar:
      tar.add(folder, arcname='cifar-100-python')
    for f in folder.iterdir():
      f.unlink()
    folder.rmdir()
  return root


def tiered_image(i: int, size: int = 84) -> np.ndarray:
  """A smooth image (compresses like a photo, unlike noise), distinct per i."""
  y, x = np.mgrid[0:size, 0:size]
  rng = np.random.default_rng(i)
  a, b, c = rng.uniform(0.02, 0.2, 3)
  image = np.stack([np.sin(a * x + i) * 60 + 128, np.cos(b * y - i) * 60 + 128,
                    np.sin(c * (x + y)) * 60 + 128], -1) + rng.normal(0, 6, (size, size, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_tiered_pickles(root: pathlib.Path, per_class: int = 1, pool: int = 0, encode=None) -> pathlib.Path:
  """The authors' pickles for every listed class. pool > 0 reuses `pool` distinct images
  (fast to generate at benchmark sizes; each list item is still its own array). encode(i) -> (ext, bytes)
  of the i-th item over all splits, instead of a PNG of tiered_image(i)."""
  root.mkdir(parents=True, exist_ok=True)
  encoded = [np.frombuffer(_png(tiered_image(i)), np.uint8).reshape(-1, 1) for i in range(pool)]
  count = 0
  for split in sources.SPLITS:
    rows = sources.class_list('tiered_imagenet', split)
    categories = sorted({c for _, c in rows})
    specific = np.repeat(np.arange(len(rows), dtype=np.int32), per_class)
    items = []
    for _ in specific:
      data = encode(count)[1] if encode else None if pool else _png(tiered_image(count))
      items.append(encoded[count % pool].copy() if data is None else np.frombuffer(data, np.uint8).reshape(-1, 1))
      count += 1
    with open(root / f'{split}_images_png.pkl', 'wb') as f:
      pickle.dump(items, f, protocol=2)
    del items
    labels = {'label_specific': specific,
              'label_general': np.array([categories.index(rows[s][1]) for s in specific], np.int32),
              'label_specific_str': [f'synset {w}' for w, _ in rows], 'label_general_str': categories}
    with open(root / f'{split}_labels.pkl', 'wb') as f:
      pickle.dump(labels, f, protocol=2)
  return root


def write_tiered_folder(root: pathlib.Path) -> pathlib.Path:
  """ILSVRC-12 train layout train/<wnid>/<wnid>_<n>.JPEG, one non-square JPEG per listed class."""
  for split in sources.SPLITS:
    for i, (wnid, _) in enumerate(sources.class_list('tiered_imagenet', split)):
      folder = root / 'train' / wnid
      folder.mkdir(parents=True)
      Image.fromarray(tiered_image(i, 96)[:, :90]).save(folder / f'{wnid}_{i}.JPEG', quality=90)
  return root


def write_cub(root: pathlib.Path, per_class: int = 1, layout: str = 'folder', encode=None) -> pathlib.Path:
  """CUB_200_2011 with the real class folder names, per_class JPEGs (non-square) per class; encode(i) ->
  (ext, bytes) of the i-th image (0-based, images.txt order) instead."""
  folder = root / 'CUB_200_2011'
  names = sorted(row[0] for split in sources.SPLITS for row in sources.class_list('cub', split))
  images, labels = [], []
  for c, name in enumerate(names, start=1):
    (folder / 'images' / name).mkdir(parents=True)
    for k in range(per_class):
      ext, data = encode(len(images)) if encode else ('.jpg', None)
      rel = f'{name}/{name.split(".", 1)[1]}_{k:04d}_{c}{ext}'
      if data is None:
        Image.fromarray(tiered_image(c * 10 + k, 100)[:, :80]).save(folder / 'images' / rel, quality=90)
      else:
        (folder / 'images' / rel).write_bytes(data)
      images.append(rel)
      labels.append(c)
  (folder / 'classes.txt').write_text(''.join(f'{c} {n}\n' for c, n in enumerate(names, start=1)))
  (folder / 'images.txt').write_text(''.join(f'{i} {p}\n' for i, p in enumerate(images, start=1)))
  (folder / 'image_class_labels.txt').write_text(''.join(f'{i} {c}\n' for i, c in enumerate(labels, start=1)))
  (folder / 'train_test_split.txt').write_text(''.join(f'{i} {i % 2}\n' for i in range(1, len(images) + 1)))
  if layout == 'tgz':
    with tarfile.open(root / 'CUB_200_2011.tgz', 'w:gz') as tar:
      tar.add(folder, arcname='CUB_200_2011')
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(folder)
  return root


KINDS = ('rgba', 'palette', 'sixteen', 'exif', 'cmyk', 'grey')


def adversarial(kind: str, seed: int, size=(70, 50)) -> tuple[str, bytes]:
  """(extension, bytes) of one file of `kind` (KINDS), width x height `size`, content distinct per seed:
  rgba: RGBA PNG, a third fully transparent over dark colour, a third half transparent; palette: P PNG
  whose index 1 is transparent; sixteen: 16-bit grey PNG ('I;16', values 0..65535 with 25700 -> 100);
  exif: JPEG stored sideways with EXIF orientation 6; cmyk: CMYK JPEG; grey: 8-bit grey PNG."""
  w, h = size
  base = tiered_image(seed, max(w, h))[:h, :w]
  out = io.BytesIO()
  if kind == 'rgba':
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, : w // 3], alpha[:, w // 3: 2 * w // 3] = 0, 128
    Image.fromarray(np.dstack([base // 4, alpha]), 'RGBA').save(out, 'PNG')
  elif kind == 'palette':
    palette = Image.fromarray(base).quantize(16)
    index = np.asarray(palette).copy()
    index[: h // 2, : w // 2] = 1
    im = Image.fromarray(index, 'P')
    im.putpalette(palette.getpalette())
    im.save(out, 'PNG', transparency=1)
  elif kind == 'sixteen':
    values = base[..., 0].astype(np.uint32) * 257 + (np.arange(w)[None] * 37 % 257)
    values[0, :4] = (25700, 65535, 0, 128)
    Image.fromarray(values.astype(np.uint16)).save(out, 'PNG')
  elif kind == 'exif':
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(base))).save(out, 'JPEG', quality=90, exif=exif.tobytes())
  elif kind == 'cmyk':
    Image.fromarray(base).convert('CMYK').save(out, 'JPEG', quality=90)
  elif kind == 'grey':
    Image.fromarray(base).convert('L').save(out, 'PNG')
  else:
    raise ValueError(kind)
  return ('.jpg' if kind in ('exif', 'cmyk') else '.png'), out.getvalue()
