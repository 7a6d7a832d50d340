"""The wheel holds everything the code opens and works from any directory: `fewshot-jax` with the
packaged presets (`--config=<method>:<preset>`) or a config file's path, as `python launch.py`."""

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """(wheel path, build output) of `pip wheel .` (isolated build: the setuptools users get)."""
  out = tmp_path_factory.mktemp("wheel")
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO)],
                     capture_output=True, text=True, timeout=600, cwd=str(out), check=False)
  subprocess.run(["rm", "-rf", str(REPO / "build")], check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  [path] = out.glob("fewshot_jax-*.whl")
  return path, p.stdout + p.stderr


def test_the_wheel_holds_every_package_file_and_the_command(wheel):
  path, log = wheel
  assert "absent from the `packages` configuration" not in log and "Package would be ignored" not in log
  tracked = subprocess.run(["git", "ls-files", "fewshot_jax"], cwd=str(REPO), capture_output=True, text=True,
                           check=True).stdout.split()
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = z.read(entry).decode()
  missing = [f for f in tracked if f not in names]
  assert not missing, missing  # class lists, configs, every module
  assert "fewshot_jax/configs/protonet.py" in names and "fewshot_jax/data/splits/cub/test.txt" in names
  assert "fewshot-jax = fewshot_jax.main:run" in scripts


def test_the_installed_command_runs_the_main_job_from_another_directory(wheel, tmp_path, make_config):
  """Installed (--target, no dependencies: this interpreter has them) and run from an empty folder:
  imports come from the install, not the checkout; packaged presets and a user's own config file."""
  target, cwd = tmp_path / "site", tmp_path / "elsewhere"
  cwd.mkdir()
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                  str(wheel[0])], check=True, capture_output=True, timeout=300)
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  where = subprocess.run([sys.executable, "-c", "import fewshot_jax.main as m; print(m.__file__)"], cwd=str(cwd),
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert where.startswith(str(target)), where
  small = ["--config.train.steps=2", "--config.train.eval_every=2", "--config.eval.val_episodes=4",
           "--config.eval.episodes=8", f"--config.data.data_dir={make_config().data.data_dir}"]
  command = str(target / "bin" / "fewshot-jax")
  p = subprocess.run([command, "--config=matchingnet:synthetic", f"--workdir={cwd / 'w'}"] + small, cwd=str(cwd),
                     env=env, capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  assert '"method": "matchingnet"' in p.stdout and '"episodes": 8' in p.stdout
  own = cwd / "mine.py"  # a user's config file built on a packaged one
  own.write_text("from fewshot_jax import config\n\ndef get_config(preset='x'):\n"
                 "  c = config.load_file(config.CONFIG_DIR + '/protonet.py', 'synthetic')\n"
                 "  c.model.features = 16\n  return c\n")
  p = subprocess.run([command, "--config=mine.py:x", f"--workdir={cwd / 'w2'}", "--mode=train"] + small[:-2] +
                     [small[-1]], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  assert '"features": 16' in (cwd / "w2" / "config.json").read_text()
  p = subprocess.run([command, "--config=nosuch:synthetic"], cwd=str(cwd), env=env, capture_output=True, text=True,
                     timeout=120, check=False)
  assert p.returncode == 2 and "packaged configs: default, idemenet, lgmnet, matchingnet, protonet" in p.stderr
