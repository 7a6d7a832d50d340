"""Shared fixtures: real data location and a session-wide prepared TFDS data_dir."""

import importlib.util
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("FEWSHOT_DATA_DIR", REPO.parent / "shared" / "data"))


def load_config(method: str, preset: str):
  """configs/<method>.py:<preset>, as launch.py would load it."""
  spec = importlib.util.spec_from_file_location(f"_cfg_{method}", REPO / "configs" / f"{method}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


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
