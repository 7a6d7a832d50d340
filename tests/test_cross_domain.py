"""Cross-domain evaluation (eval.data): a workdir trained on one dataset scored on another's split,
its images converted to the training channel count, resized to the model's input and normalised with the
training statistics. On the CUB fixture in its real on-disk format (tests/format_fixtures.py) and the
generated `synthetic` dataset: no real copy is needed."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from fewshot_jax import config as config_lib
from fewshot_jax import evaluate
from fewshot_jax import methods
from fewshot_jax import sharding
from fewshot_jax import train as train_lib
from fewshot_jax.data import augment, input_pipeline
from fewshot_jax.errors import ConfigError
from tests import format_fixtures as ff
from tests.conftest import load_config

_TINY = {'train.steps': 2, 'train.eval_every': 2, 'train.log_every': 1, 'train.steps_per_call': 2,
         'train.checkpoint_every': 2, 'eval.val_episodes': 2, 'eval.episodes': 4, 'eval.tasks': 2,
         'eval.queries': 1, 'episode.queries': 1, 'episode.tasks': 1, 'episode.train_ways': 0}


def _config(preset, data_dir, **overrides):
  c = load_config('protonet', preset)
  c.data.data_dir = str(data_dir)
  for key, value in {**_TINY, **overrides}.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def _resize(images, size):
  """numpy reference of augment.resize: separable triangle filter, widened by the scale when shrinking
  (antialiased bilinear), half-pixel centres, weights normalised per output pixel."""
  def matrix(n_in):
    scale = size / n_in
    width = 1.0 / scale if scale < 1 else 1.0
    centres = (np.arange(size) + 0.5) / scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width)
    return w / w.sum(1, keepdims=True)
  m = matrix(images.shape[1])
  return np.einsum('ih,jw,nhwc->nijc', m, matrix(images.shape[2]), images.astype(np.float64))


def _expected(stored, channels, mean, std, size):
  """The numpy preprocessing of cross-domain evaluation: channels, normalisation, resize."""
  stored = stored.astype(np.int64)
  if stored.shape[-1] == 3 and channels == 1:
    grey = (stored[..., 0] * 19595 + stored[..., 1] * 38470 + stored[..., 2] * 7471 + 0x8000) >> 16
    stored = grey[..., None]
  elif stored.shape[-1] == 1 and channels == 3:
    stored = np.repeat(stored, 3, -1)
  return _resize((stored - np.asarray(mean)) / np.asarray(std), size)


def _check_episode(c, stored):
  """Every support and query image of an evaluation batch is the numpy preprocessing of ITS OWN stored image:
  the batch is drawn again with the evaluator's key from the dataset with each image's index written in
  its pixels (no augmentation), which tells the stored image of every slot."""
  c, mesh = sharding.setup(c)
  expected = _expected(stored, input_pipeline.channels(c), c.data.mean, c.data.std, augment.input_size(c))
  dataset = evaluate.load_eval(c, mesh)
  evaluator = evaluate.Evaluator(methods.build(c), c, mesh, 'test', 4, dataset=dataset)
  _, episode = next(evaluator.episode_batches())
  images = np.concatenate([np.asarray(episode.support).reshape((-1,) + expected.shape[1:]),
                           np.asarray(episode.query).reshape((-1,) + expected.shape[1:])])
  tags = np.zeros(dataset.images.shape, np.uint8)
  tags[:, 0, 0, 0], tags[:, 0, 1, 0] = np.arange(len(tags)) % 256, np.arange(len(tags)) // 256
  tagged = dataset.replace(images=jax.device_put(tags, dataset.images.sharding))
  sampling = dict(evaluate.standard_sampling(c), augment=None)  # floats = uint8 / 255
  raw = jax.jit(lambda d: evaluate.sample_batch(evaluate.episode_keys(c)[0], d, 0, evaluator.tasks, **sampling))(
      tagged)
  index = lambda x: np.round(np.asarray(x)[..., 0, 0, 0] * 255 + np.asarray(x)[..., 0, 1, 0] * 255 * 256)
  own = np.concatenate([index(raw.support).reshape(-1), index(raw.query).reshape(-1)]).astype(int)
  assert len(stored) == len(tags) and len(own) == len(images) and len(set(own.tolist())) > len(own) // 2
  for i, (image, k) in enumerate(zip(images, own)):
    np.testing.assert_allclose(image, expected[k], atol=1e-4, err_msg=f'episode image {i}, stored image {k}')


@pytest.fixture(scope='module')
def cub(tmp_path_factory):
  return ff.write_cub(tmp_path_factory.mktemp('cub'), per_class=2)


def test_grey_model_on_cub(cub, tmp_path):
  """synthetic (grey 28 px) -> CUB fixture (RGB 84 px): luma, resized 84 -> 28, the training statistics."""
  c = _config('synthetic', tmp_path / 'tfds')
  workdir = str(tmp_path / 'work')
  train_lib.train_and_evaluate(c, workdir)
  in_domain = evaluate.evaluate_checkpoint(c, workdir)
  c.eval.data, c.eval.data_manual_dir = 'cub:test', str(cub)
  cross = evaluate.evaluate_checkpoint(c, workdir)
  assert cross['dataset'] == 'synthetic' and cross['eval_data'] == 'cub:test' and cross['split'] == 'test'
  assert cross['episodes'] == 4
  assert in_domain['eval_data'] == 'synthetic:test'
  with open(f'{workdir}/eval_test.json') as f:
    written = json.load(f)
  assert sorted(written) == ['cub:test/standard/5w1s/5q/best', 'standard/5w1s/5q/best']
  assert written['standard/5w1s/5q/best']['accuracy'] == in_domain['accuracy']
  assert written['cub:test/standard/5w1s/5q/best']['accuracy'] == cross['accuracy']
  # The episode's images: CUB's stored RGB 84 px as the grey 28 px model sees them.
  c = config_lib.validate(c)
  dataset = evaluate.load_eval(c)
  assert dataset.images.shape[1:] == (84, 84, 1) and dataset.num_classes == 50
  source = evaluate.eval_source(c)
  stored = np.asarray(input_pipeline.load(source, 'test').images)
  assert stored.shape[1:] == (84, 84, 3)
  # The conversion is PIL's convert('L') bit for bit.
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(dataset.images[i, ..., 0]),
                                  np.asarray(Image.fromarray(stored[i]).convert('L')))
  _check_episode(c, stored)


def test_rgb_model_on_grey_data(cub, tmp_path):
  """CUB fixture (RGB, input 42 px) -> synthetic (grey 28 px): the channel repeated, resized 28 -> 42."""
  c = _config('cub-5w1s', tmp_path / 'tfds', **{'data.input_size': 42})
  c.data.manual_dir = str(cub)
  workdir = str(tmp_path / 'work')
  train_lib.train_and_evaluate(c, workdir)
  c.eval.data = 'synthetic'  # split: eval.split
  cross = evaluate.evaluate_checkpoint(c, workdir)
  assert cross['dataset'] == 'cub' and cross['eval_data'] == 'synthetic:test'
  with open(f'{workdir}/eval_test.json') as f:
    assert list(json.load(f)) == ['synthetic:test/standard/5w1s/5q/best']
  c = config_lib.validate(c)
  dataset = evaluate.load_eval(c)
  assert dataset.images.shape[1:] == (28, 28, 3)
  stored = np.asarray(input_pipeline.load(evaluate.eval_source(c), 'test').images)
  assert stored.shape[1:] == (28, 28, 1)
  _check_episode(c, stored)


def test_in_domain_names_are_in_domain():
  c = load_config('protonet', 'synthetic')
  assert config_lib.parse_eval_data(c) == ('synthetic', 'test')
  c.eval.data = 'synthetic:val'
  assert config_lib.parse_eval_data(c) == ('synthetic', 'val') and evaluate.eval_source(c) is None
  result = {'protocol': 'standard', 'ways': 5, 'shots': 1, 'queries_per_episode': 75, 'checkpoint': 'best',
            'dataset': 'synthetic', 'eval_data': 'synthetic:val'}
  assert evaluate.result_key(result) == 'standard/5w1s/75q/best'
  assert evaluate.result_key({**result, 'eval_data': 'cub:test'}) == 'cub:test/standard/5w1s/75q/best'


@pytest.mark.parametrize('value, message', [
    ('nope:test', "eval.data='nope:test' names an unknown dataset 'nope'; valid: \\['omniglot'"),
    ('cub:tset', "eval.data='cub:tset' names an unknown split 'tset'; valid: \\['train', 'val', 'test'\\]"),
    ('cub:', "eval.data='cub:' names an unknown split ''"),
    ('cub:test:x', "eval.data='cub:test:x' must be NAME or NAME:SPLIT; valid names: \\['omniglot'"),
])
def test_bad_eval_data_is_one_line(value, message):
  c = load_config('protonet', 'synthetic')
  c.eval.data = value
  with pytest.raises(ConfigError, match=message) as e:
    config_lib.validate(c)
  assert '\n' not in str(e.value)


def test_modes_that_do_not_read_eval_data_refuse_it(tmp_path):
  """--mode=compare / export / predict / convert score or write the training data's model only: a cross-domain
  flag there is one line and exit 2, not silently ignored."""
  import subprocess
  import sys
  from tests.conftest import REPO
  for mode in ('compare', 'predict'):
    run = subprocess.run([sys.executable, str(REPO / 'launch.py'), f'--mode={mode}', f'--workdir={tmp_path}',
                          '--config.eval.data=cub:test'], cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
    assert (f"--config.eval.data='cub:test' is read by --mode=eval and train_eval only; --mode={mode}"
            in run.stderr), run.stderr
  assert not any(tmp_path.iterdir())
