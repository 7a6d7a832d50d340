"""Shared fixtures: real data location and a session-wide prepared TFDS data_dir."""

import os
import pathlib

import pytest

from fewshot_jax import xla_setup

xla_setup.set_cpu_defaults()  # the XLA:CPU settings launch.py uses, before any test creates a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("FEWSHOT_DATA_DIR", REPO.parent / "shared" / "data"))


def load_config(method: str, preset: str):
  """configs/<method>.py:<preset>, as launch.py would load it."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_file(str(REPO / "configs" / f"{method}.py"), preset)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory):
  """One TFDS data_dir per test worker; builders prepare into it once."""
  return str(tmp_path_factory.mktemp("tfds_prepared"))


@pytest.fixture
def make_config(prepared_dir):
  """Config factory with the data read from FEWSHOT_DATA_DIR and prepared into the session dir."""

  def make(method="protonet", preset="synthetic", **overrides):
    c = load_config(method, preset)
    c.data.data_dir = prepared_dir
    if c.data.name == "omniglot":
      c.data.manual_dir = str(DATA / "omniglot")
    elif c.data.name == "mini_imagenet":
      c.data.manual_dir = str(DATA / "miniimagenet")
    for key, value in overrides.items():
      node = c
      *path, last = key.split(".")
      for p in path:
        node = node[p]
      node[last] = value
    return c

  return make
