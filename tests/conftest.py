"""Shared fixtures: real data location and a session-wide prepared TFDS data_dir."""

import os
import pathlib
import shutil
import tempfile

import pytest

# One persistent XLA compilation cache per test run, shared by the xdist workers and the
# launch.py subprocesses (both inherit the controller's environment): many tests compile the same steps, and
# XLA:CPU compilation is most of their time (tests/test_safety.py: 226 s -> 143 s from a cold
# cache). Set before anything imports jax; removed by the controller at the end of the run.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"fewshot_jax_test_cache_{_RUN}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

from fewshot_jax import xla_setup  # pylint: disable=g-import-not-at-top

xla_setup.set_cpu_defaults()  # the XLA:CPU settings launch.py uses, before any test creates a backend

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("FEWSHOT_DATA_DIR", REPO.parent / "shared" / "data"))


def load_config(method: str, preset: str):
  """configs/<method>.py:<preset>, as launch.py would load it."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_file(str(REPO / "configs" / f"{method}.py"), preset)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, worker_id):
  """One TFDS data_dir for the run, shared by the xdist workers (each dataset is prepared once,
  under input_pipeline's file lock, whichever worker needs it first)."""
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # the workers' basetemps are popen-gw<N> folders of one run folder
  path = root / "tfds_prepared"
  path.mkdir(exist_ok=True)
  return str(path)


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
    shutil.rmtree(JAX_CACHE, ignore_errors=True)


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
