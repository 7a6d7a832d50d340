"""The Dataset record: all the library knows about a dataset, declared once by data/<name>.py
(as methods/<name>.py declare Method records) and listed in data/registry.py."""

import dataclasses
from typing import Any, Callable, Mapping

from fewshot_jax.data import image_files
from fewshot_jax.errors import ConfigError

# Pixel statistics in 0..255 units. Ink datasets scale pixels to [0, 1]; photos derived from
# ImageNet use ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) x 255 by convention.
GREY_MEAN, GREY_STD = (0.0,), (255.0,)
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# A task's fewest classes: a 1-way task has one answer, right whatever the model (nothing is learned).
MIN_WAYS = 2


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A few-shot dataset as configs, builders and methods see it.

  name: data.name. schemes: its class splits (data.split); the first is the default.
  folder: the folder under $FEWSHOT_DATA_DIR holding our copy (config's default data.manual_dir);
    None where there is none: a generated dataset (no files) or the user's own files.
  raw_files: what a manual_dir holds and where else the files come from ('' when generated).
  image_size, channels: the stored images (data.image_size's default; channels is data.channels'
    where `options` has it).
  mean, std: per-channel pixel statistics (0..255 units) that data.mean / data.std start from; () for
    statistics of the prepared train split (input_pipeline.with_statistics fills them in).
  preset: the prefix of the configs' presets on it (configs/<method>.py:<preset>-5w1s).
  base_classes: classes of the default scheme's train split (the classifier head of a method that
    pretrains on them); 0 where only the files tell.
  builder(scheme=, image_size=, data_dir=, manual_dir=) -> its unprepared TFDS builder.
  resizable: the builder stores any image_size it accepts (and checks it); otherwise only image_size.
  placement: the data.placement configs start from ('sharded': a split larger than one device).
  read_image(source, where, size, channels) -> uint8 [size, size, channels]: THE reading of an image file
    (a path, encoded bytes or an opened PIL image): the builder stores every file it decodes with it and
    prediction (api.Model.read_images / prepare, --mode=predict) reads with it, so a model predicts on the
    array it was trained on. Default image_files.read (orientation, transparency over white, 16-bit,
    the one channel rule, the whole image resized bicubic); a record names its own resampling or reading.
  options: further data.* keys the builder reads, with their defaults: config.apply_dataset adds
    them to data.*, and make_builder passes them on as keyword arguments.
  """

  name: str
  schemes: tuple[str, ...]
  folder: str | None
  raw_files: str
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  preset: str
  base_classes: int
  builder: Callable[..., Any]
  resizable: bool = False
  placement: str = 'replicated'
  read_image: Callable[..., Any] = image_files.read
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  @property
  def generated(self) -> bool:
    """Made from a seed: no files at all."""
    return not self.raw_files

  def make_builder(self, *, scheme: str, image_size: int, data_dir, manual_dir=None, **options):
    """The builder of a split scheme at a stored size, both checked first (and `options`, the record's,
    by the builder); nothing is written until builders.prepare."""
    _check(self.name, 'scheme', scheme, self.schemes)
    if not self.resizable:
      _check(self.name, 'image_size', image_size, (self.image_size,))
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ConfigError(f'{self.name} reads no data.{unknown[0]}; its own data.* keys: '
                        f'{sorted(self.options) or "none"}')
    return self.builder(scheme=scheme, image_size=image_size, data_dir=data_dir, manual_dir=manual_dir,
                        **{**self.options, **options})


def fixed_builder(builder_class) -> Callable[..., Any]:
  """The factory of a builder class with one scheme at one size (Dataset.make_builder checks both)."""
  def make(*, scheme, image_size, data_dir, manual_dir):
    del scheme, image_size  # checked by Dataset.make_builder
    return builder_class(data_dir=data_dir, manual_dir=manual_dir)
  return make


def check_ways(ways: int, what: str, error=ConfigError) -> None:
  """The one check of a task's class count (a config's episode.ways, prediction's support classes):
  `what` says where the count comes from ('episode.ways=1 asks for', '--support=S holds')."""
  if ways < MIN_WAYS:
    raise error(f'{what} {ways} class{"" if ways == 1 else "es"}; a task needs at least {MIN_WAYS} (a 1-way '
                'task has one answer, right whatever the model)')


def _check(dataset: str, field: str, value, valid: tuple) -> None:
  if isinstance(value, bool) or value not in valid:
    raise ConfigError(f'{dataset} {field} {value!r} is invalid; valid: {", ".join(map(str, valid))}')
