"""Preparation time and peak host memory of the tieredImageNet builder at several sizes.

For each size N, writes the authors' pickle layout ({split}_images_png.pkl +
{split}_labels.pkl, all 608 classes, N // 608 PNG-encoded 84x84x3 images each;
tests/format_fixtures.py) into a temporary folder, then prepares it in a fresh
process and reports that process's wall time and peak resident memory
(VmHWM), beside the RSS of a process that only imports the builder. Peak
memory that does not grow with N is the goal (the real train split is 448,695
images, ~9.5 GB decoded).

  python benchmarks/prepare_tiered.py --sizes=25000,100000 [--workdir=/tmp/x]
"""

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_list("sizes", ["25000", "100000"], "Total images (all splits) of each measured fixture.")
flags.DEFINE_string("workdir", None, "Where fixtures and prepared data go (default: a temporary folder).")
flags.DEFINE_integer("pool", 500, "Distinct images the fixture cycles through (encoding 100k PNGs is slow).")
flags.DEFINE_string("prepare", None, "Internal: prepare MANUAL_DIR:DATA_DIR and print the measurement.")
FLAGS = flags.FLAGS

_IMPORT_ONLY = ("from fewshot_jax.data import builders; from benchmarks.prepare_tiered import peak_rss_mb; "
                "print(peak_rss_mb())")


def peak_rss_mb() -> float:
  """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
  from the parent at fork + exec, so a child would report the benchmark's own fixture memory."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _prepare(manual: str, data_dir: str) -> None:
  from fewshot_jax.data import builders  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  builder = builders.prepare(builders.make_builder("tiered_imagenet", scheme="ren", image_size=84,
                                                   data_dir=data_dir, manual_dir=manual))
  seconds = time.perf_counter() - start
  peak = peak_rss_mb()  # before anything reads the result back
  images = sum(split.num_examples for split in builder.info.splits.values())
  print(json.dumps({"seconds": seconds, "images": images, "peak_rss_mb": peak}))


def main(argv):
  del argv
  if FLAGS.prepare:
    _prepare(*FLAGS.prepare.split(":"))
    return
  from tests import format_fixtures  # pylint: disable=g-import-not-at-top
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="prepare_tiered_")
  env = dict(os.environ, PYTHONPATH=REPO, TQDM_DISABLE="1")
  base = float(subprocess.run([sys.executable, "-c", _IMPORT_ONLY], env=env, capture_output=True, text=True,
                              check=True).stdout)
  print(f"tieredImageNet preparation, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{datetime.date.today()}; a process that only imports the builder: {base:.0f} MB RSS")
  print("| images | pickles on disk | prepare (s) | images/s | peak RSS (MB) |")
  print("|---:|---:|---:|---:|---:|")
  for size in (int(s) for s in FLAGS.sizes):
    manual, data_dir = os.path.join(root, f"manual_{size}"), os.path.join(root, f"tfds_{size}")
    format_fixtures.write_tiered_pickles(__import__("pathlib").Path(manual), per_class=max(1, size // 608),
                                         pool=FLAGS.pool)
    on_disk = sum(os.path.getsize(os.path.join(manual, f)) for f in os.listdir(manual)) / 2**30
    out = subprocess.run([sys.executable, __file__, f"--prepare={manual}:{data_dir}"], env=env,
                         capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"preparing {manual} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {r['images']:,} | {on_disk:.2f} GB | {r['seconds']:.0f} | {r['images'] / r['seconds']:.0f} | "
          f"{r['peak_rss_mb']:.0f} |", flush=True)
    shutil.rmtree(manual)
    shutil.rmtree(data_dir)
  if not FLAGS.workdir:
    shutil.rmtree(root)


if __name__ == "__main__":
  app.run(main)
