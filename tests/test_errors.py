"""User-caused errors, end to end through launch.py.

Contract: each is one line `error: <message>` on stderr naming the bad value and
what is valid, exit code 2, no traceback. An unknown preset fails while absl
parses --config (before launch.main runs): non-zero exit, and stderr names the
preset and the valid ones.

Every test starts `python launch.py` (a few seconds each, mostly the JAX import),
so there are few of them; one small ProtoNet run on the synthetic dataset is
trained once and shared by the checkpoint tests.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("FEWSHOT_DATA_DIR", REPO.parent / "shared" / "data"))
PRESETS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "mini-5w1s", "mini-5w5s",
           "synthetic")
# Two steps, validated and checkpointed at step 2; a 16-episode test evaluation.
TINY_RUN = ("--config.train.steps=2", "--config.train.eval_every=2", "--config.train.log_every=1",
            "--config.train.steps_per_call=1", "--config.eval.val_episodes=8", "--config.eval.episodes=16")

needs_omniglot = pytest.mark.skipif(not (DATA / "omniglot" / "images_background.npz").is_file(),
                                    reason=f"no Omniglot in {DATA} (set FEWSHOT_DATA_DIR)")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """TFDS data_dir shared by the launches of this session (synthetic is prepared once)."""
  return tmp_path_factory.mktemp("errors_tfds")


def launch(*args, tfds_dir, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, TFDS_DATA_DIR=str(tfds_dir), FEWSHOT_DATA_DIR=str(DATA))
  return subprocess.run([sys.executable, "launch.py", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def user_error(result: subprocess.CompletedProcess, *needles) -> str:
  """The one `error:` line of a FewshotError exit; checks exit code 2, no traceback, needles."""
  lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  report = f"exit {result.returncode}, stderr:\n{result.stderr[-6000:]}"
  assert result.returncode == 2, report
  assert "Traceback" not in result.stderr, report
  assert len(lines) == 1, report
  print(lines[0])  # shown by `pytest -rP`, to judge the messages
  for needle in needles:
    assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
  return lines[0]


# ---------------------------------------------------------------- config


def test_unknown_preset_names_it_and_the_valid_ones(tmp_path):
  result = launch("--config=configs/protonet.py:nope", f"--workdir={tmp_path}", tfds_dir=tmp_path)
  assert result.returncode != 0
  assert "'nope'" in result.stderr
  for preset in PRESETS:
    assert preset in result.stderr


@pytest.mark.parametrize("flag, needles", [
    ("--config.method.name=foo", ("method.name", "'foo'", "protonet", "matchingnet")),
    ("--config.data.name=cifar", ("data.name", "'cifar'", "omniglot", "mini_imagenet", "synthetic")),
    ("--config.episode.shots=0", ("episode.shots=0", "positive")),
    ("--config.train.lr=-1", ("train.lr=-1", "> 0")),
    ("--config.train.loop=while", ("train.loop='while'", "'scan'", "'python'")),
    ("--config.data.placement=spread", ("data.placement='spread'", "'replicated'", "'sharded'")),
    ("--config.train.lr=inf", ("train.lr=inf", "finite")),
    ("--config.train.nonfinite=maybe", ("train.nonfinite='maybe'", "'stop'", "'skip'")),
    ("--config.train.lr=abc", ("--config.train.lr=abc", "takes a number")),
    ("--config.episode.ways=five", ("--config.episode.ways=five", "takes an integer")),
    ("--config.episode.foo=1", ("--config.episode.foo", "no such config key", "episode.ways", "episode.tasks")),
    ("--config.bogus.x=1", ("--config.bogus.x", "no such config key", "episode", "train")),
    ("--mode=bogus", ("--mode=bogus", "train_eval", "export")),
    ("extra_argument", ("'extra_argument'", "only flags")),
    ("--config.train.checkpoint_every=0", ("train.checkpoint_every=0", "positive")),
])
def test_bad_config_value(flag, needles, tmp_path, tfds_dir):
  result = launch(flag, "--mode=train", f"--workdir={tmp_path}", tfds_dir=tfds_dir)
  user_error(result, *needles)
  assert "Unable to initialize backend" not in result.stderr  # no INFO noise before the error
  assert not (tmp_path / "checkpoints").exists()


def test_workdir_that_is_a_file(tmp_path, tfds_dir):
  (tmp_path / "file").write_text("x")
  user_error(launch("--mode=train", f"--workdir={tmp_path / 'file'}", tfds_dir=tfds_dir), "--workdir=",
             "file", "File exists")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root (CI runs as root)")
def test_workdir_on_a_read_only_disk(tmp_path, tfds_dir):
  disk = tmp_path / "ro"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], check=True)
  try:
    user_error(launch("--mode=train", f"--workdir={disk}", tfds_dir=tfds_dir), "cannot write in --workdir",
               str(disk), "Read-only file system")
    user_error(launch("--mode=train", f"--workdir={disk / 'new'}", tfds_dir=tfds_dir), "cannot create --workdir",
               "Read-only file system")
  finally:
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("flags, needles", [
    (("--num_processes=2",), ("--num_processes", "need --distributed")),
    (("--distributed", "--num_processes=2"), ("--coordinator_address", "--process_id", "missing")),
    (("--distributed", "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"),
     ("--process_id=2", "[0, --num_processes=2)")),
    (("--distributed", "--local_device_ids=gpu0"), ("--local_device_ids=gpu0", "device numbers")),
])
def test_bad_cluster_flags(flags, needles, tmp_path, tfds_dir):
  user_error(launch(*flags, "--mode=train", f"--workdir={tmp_path}", tfds_dir=tfds_dir, timeout=120), *needles)


@pytest.mark.parametrize("flag, needles", [
    # synthetic: 200 train classes of 20 images; training draws episode.train_ways-way episodes.
    ("--config.episode.train_ways=500", ("500", "200 classes", "'train'")),
    ("--config.episode.queries=25", ("1 + 25 = 26", "20 images", "'train'", "<= 20")),
])
def test_episode_larger_than_the_split(flag, needles, tmp_path, tfds_dir):
  user_error(launch(flag, "--mode=train", f"--workdir={tmp_path}", tfds_dir=tfds_dir), *needles)


# ---------------------------------------------------------------- data directories


def test_missing_manual_dir(tmp_path):
  # Nothing prepared in a fresh data_dir; without the files the builder tries the
  # download once (fails in seconds without network) and names the manual_dir.
  result = launch("--config=configs/protonet.py:omniglot-5w1s", "--config.data.manual_dir=/nonexistent/x",
                  "--mode=train", f"--workdir={tmp_path / 'work'}", tfds_dir=tmp_path / "tfds", timeout=120)
  user_error(result, "/nonexistent/x", "images_background.npz")
  # Nothing left behind: no empty workdir, no empty dataset folder.
  assert not (tmp_path / "work").exists() and not (tmp_path / "tfds" / "fewshot_omniglot").exists()


@needs_omniglot
def test_incomplete_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "images_background.npz").symlink_to(DATA / "omniglot" / "images_background.npz")
  result = launch("--config=configs/protonet.py:omniglot-5w1s", f"--config.data.manual_dir={manual}",
                  "--mode=train", f"--workdir={tmp_path / 'work'}", tfds_dir=tmp_path / "tfds")
  user_error(result, str(manual), "images_evaluation.npz")


def _fake_mini(root: pathlib.Path, classes=3, images=4) -> pathlib.Path:
  """miniImageNet manual dir (folder layout): `classes` x `images` random 84x84 JPEGs per split."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  for s, split in enumerate(("train", "val", "test")):
    rows = ["filename,label"]
    for c in range(classes):
      wnid = f"n{s}{c:07d}"
      for i in range(images):
        name = f"{wnid}{i:08d}.jpg"
        Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(root / "images" / name)
        rows.append(f"{name},{wnid}")
    (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
  return root


def test_corrupt_image(tmp_path):
  manual = _fake_mini(tmp_path / "manual")
  corrupt = manual / "images" / "n1000000200000001.jpg"  # val split
  corrupt.write_bytes(b"\xff\xd8 this is not a JPEG")
  result = launch("--config=configs/protonet.py:mini-5w1s", f"--config.data.manual_dir={manual}",
                  "--mode=train", f"--workdir={tmp_path / 'work'}", tfds_dir=tmp_path / "tfds")
  user_error(result, corrupt.name, "cannot decode")


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """A workdir with a 2-step ProtoNet checkpoint (latest and best), evaluated once."""
  workdir = tmp_path_factory.mktemp("trained") / "work"
  result = launch(*TINY_RUN, "--mode=train_eval", f"--workdir={workdir}", tfds_dir=tfds_dir)
  assert result.returncode == 0, result.stderr[-6000:]
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  assert scores["step"] == 2 and scores["episodes"] == 16 and scores["method"] == "protonet"
  assert (workdir / "checkpoints" / "2").is_dir() and (workdir / "best" / "2").is_dir()
  return workdir


def test_export_convert_compare_through_launch(trained, tmp_path, tfds_dir):
  """Not an error case: --mode=export, convert and compare through launch.py itself for a method
  beside IDeMe-Net (the API behind them is tested per method in test_compare.py). The exported
  file converts back to the very same arrays, and PyTorch scores them like JAX."""
  torch_file, back = tmp_path / "protonet.pt", tmp_path / "back"
  for mode, workdir in (("export", trained), ("convert", back), ("compare", back)):
    result = launch(*TINY_RUN, f"--mode={mode}", f"--workdir={workdir}", f"--torch_checkpoint={torch_file}",
                    tfds_dir=tfds_dir)
    assert result.returncode == 0, result.stderr[-6000:]
  from fewshot_jax import config as config_lib, restore, sharding, state_dicts  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(str(REPO / "configs" / "default.py"), "synthetic")
  loaded = [restore.load_for_eval(config, str(w), sharding.make_mesh(), "best")[1] for w in (trained, back)]
  got, expected = (state_dicts.plain({"params": s.params, **s.model_state}) for s in loaded)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  compared = json.loads((back / "compare_test.json").read_text())
  assert compared["method"] == "protonet" and compared["episodes"] == 16
  assert compared["modes"]["default"]["within_tolerance"], compared["modes"]


def test_eval_without_checkpoint(tmp_path, tfds_dir):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  user_error(launch(*TINY_RUN, "--mode=eval", f"--workdir={workdir}", tfds_dir=tfds_dir),
             str(workdir), "--mode=train")


@pytest.mark.parametrize("damage", ["arrays", "everything"])
def test_eval_corrupt_checkpoint(damage, trained, tmp_path, tfds_dir):
  workdir = tmp_path / "work"
  shutil.copytree(trained, workdir)
  steps = [workdir / "checkpoints" / "2", workdir / "best" / "2"]
  if damage == "arrays":  # the array data of the state, metadata and meta intact
    files = [f for s in steps for f in (s / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  else:  # every file of both steps, orbax's own metadata and metrics included
    files = [f for s in steps for f in s.rglob("*") if f.is_file()]
  assert files
  for f in files:
    f.write_bytes(b"garbage")
  line = user_error(launch(*TINY_RUN, "--mode=eval", f"--workdir={workdir}", tfds_dir=tfds_dir),
                    "unreadable")
  assert str(workdir) in line


def test_eval_checkpoint_of_another_method(trained, tfds_dir):
  line = user_error(launch("--config=configs/matchingnet.py:synthetic", *TINY_RUN, "--mode=eval",
                           f"--workdir={trained}", tfds_dir=tfds_dir),
                    "'protonet'", "'matchingnet'", str(trained / "best" / "2"))
  assert "does not match the config" in line


def test_eval_checkpoint_of_another_model_size(trained, tfds_dir):
  line = user_error(launch(*TINY_RUN, "--config.model.features=32", "--mode=eval",
                           f"--workdir={trained}", tfds_dir=tfds_dir),
                    "does not fit the model", str(trained / "best" / "2"))
  assert "(64,)" in line and "(32,)" in line


def test_convert_errors_name_the_problem(tmp_path, tfds_dir):
  """--mode=convert: a missing flag, a missing file and a pickle carrying code, each one line."""
  base = ("--config=configs/idemenet.py:pretrain", "--mode=convert", f"--workdir={tmp_path / 'w'}")
  user_error(launch(*base, tfds_dir=tfds_dir), "--torch_checkpoint")
  user_error(launch(*base, f"--torch_checkpoint={tmp_path / 'none.t7'}", tfds_dir=tfds_dir), "none.t7")
  import pickle  # pylint: disable=g-import-not-at-top

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {tmp_path / 'ran'}",))

  with open(tmp_path / "evil.t7", "wb") as f:
    pickle.dump(Payload(), f)
  user_error(launch(*base, f"--torch_checkpoint={tmp_path / 'evil.t7'}", tfds_dir=tfds_dir), "evil.t7")
  assert not (tmp_path / "ran").exists()
  # Every method converts now (issue 13): a ProtoNet preset gets as far as the file.
  user_error(launch("--config=configs/protonet.py:synthetic", "--mode=convert", "--torch_checkpoint=x.t7",
                    f"--workdir={tmp_path / 'w'}", tfds_dir=tfds_dir), "x.t7 does not exist")


def test_export_errors_name_the_problem(tmp_path, tfds_dir):
  """--mode=export: a missing flag and a workdir with no checkpoint, each one line."""
  base = ("--config=configs/idemenet.py:pretrain", "--mode=export", f"--workdir={tmp_path / 'w'}")
  user_error(launch(*base, tfds_dir=tfds_dir), "--torch_checkpoint")
  user_error(launch(*base, f"--torch_checkpoint={tmp_path / 'out.t7'}", tfds_dir=tfds_dir), str(tmp_path / "w"))
  assert not (tmp_path / "out.t7").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tfds_dir):
  disk = tmp_path / "disk"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
  try:  # 2 MiB: config.json and the step-10 checkpoint fit, step 20 does not
    result = launch("--mode=train", f"--workdir={disk / 'w'}", "--config.train.steps=40",
                    "--config.train.checkpoint_every=10", "--config.train.steps_per_call=10",
                    "--config.train.log_every=10", "--config.train.eval_every=20", tfds_dir=tfds_dir)
    # Step 20 validates: its best checkpoint is written first (train._save), and fails first.
    user_error(result, "cannot write a checkpoint", str(disk / "w" / "best"), "the disk is full")
    assert sorted(os.listdir(disk / "w" / "checkpoints"))[0] == "10"
  finally:
    subprocess.run(["umount", str(disk)], check=False)
