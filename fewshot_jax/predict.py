"""`launch.py --mode=predict`: a trained workdir classifies image files, through fewshot_jax.api.

--support=DIR holds one folder per class (the folder names are the class names, sorted), its images
inside; --query is comma-separated folders (searched recursively), globs or files. One JSON line per
query, {"path", "label", "probabilities": {class: p}}, in the order of the sorted query paths, goes to
stdout or atomically to --out; then one JSON line {"summary": {...}} on stderr. The output is written
only once every query is predicted, so an error leaves nothing half-written.

Files: in a folder or a glob's matches, only visible files with an extension of image_files.EXTENSIONS
are read (the image-folder dataset's listing: the same extensions, skipped entries and messages); the
others (notes, .DS_Store, hidden files, __MACOSX) are skipped and counted in a `warning:` line and the summary;
an image file that does not decode is an error naming it (a support or query silently dropped would
change the task). Files named in a comma-separated --query are always read.
"""

import glob
import json
import os
import sys
import time

from fewshot_jax import api
from fewshot_jax.data import common, image_files
from fewshot_jax.errors import ConfigError, DataError

_GLOB_CHARS = ("*", "?", "[")


def list_support(folder: str, shots: int | None = None):
  """(class names, [paths of each class], skipped paths) of a support folder, listed as the image-folder
  dataset lists its root (image_files.list_classes); one DataError when it is not one: not a folder, no
  class folders, an image beside them, fewer than 2 classes, an empty class, fewer than `shots` images."""
  if not os.path.isdir(folder):
    raise DataError(f"--support={folder} is not a directory (it must hold one folder of images per class)")
  classes, skipped = image_files.list_classes(folder, f"--support={folder}", "--support=DIR/<class>/<image>")
  common.check_ways(len(classes), f"--support={folder} holds", DataError)
  names, paths = [], []
  for name, files in classes:
    if shots is not None:
      if len(files) < shots:
        raise DataError(f"class {name} of --support={folder} has {len(files)} image(s), fewer than --shots={shots}")
      files = files[:shots]
    names.append(name)
    paths.append(files)
  return names, paths, [os.path.join(folder, p) for p in skipped]


def list_queries(spec: str):
  """(query paths, skipped paths) of --query: comma-separated parts, each a folder (searched recursively),
  a glob, or a file (a whole spec that names an existing folder or file is taken as one part)."""
  found, skipped = [], []
  parts = [spec] if os.path.exists(spec) else [p.strip() for p in spec.split(",") if p.strip()]
  for part in parts:
    if os.path.isdir(part):
      for root, dirs, files in os.walk(part):
        dirs[:] = sorted(d for d in dirs if image_files.visible(d))
        for name in sorted(files):
          path = os.path.join(root, name)
          (found if image_files.is_image(name) else skipped).append(path)
    elif any(c in part for c in _GLOB_CHARS):
      for path in sorted(glob.glob(part, recursive=True)):
        if os.path.isfile(path):
          (found if image_files.is_image(os.path.basename(path)) else skipped).append(path)
    elif os.path.isfile(part):
      found.append(part)  # named: read whatever its extension
    else:
      raise DataError(f"--query file {part} does not exist")
  if not found:
    other = f" ({len(skipped)} other file(s) skipped)" if skipped else ""
    raise DataError(f"--query={spec} matches no image file{other}")
  return found, skipped


def check_out(out: str | None) -> None:
  if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ConfigError(f"--out={out}: directory {os.path.dirname(os.path.abspath(out))} does not exist")
  if out and os.path.isdir(out):
    raise ConfigError(f"--out={out} is a directory; give a file name (e.g. predictions.jsonl)")


def main(workdir: str, support: str, query: str, *, config=None, overrides: dict | None = None,
         out: str | None = None, mode: str | None = None, batch_size: int = api.DEFAULT_BATCH,
         shots: int | None = None, progress: bool = True,
         stdout=None, stderr=None) -> dict:
  """--mode=predict: the inputs are listed (their errors come first, in seconds), then the workdir's
  model is loaded (api.load) and `run`."""
  if batch_size < 1:
    raise ConfigError(f"--predict_batch={batch_size} must be a positive integer")
  if shots is not None and shots < 1:
    raise ConfigError(f"--shots={shots} must be a positive integer")
  check_out(out)
  inputs = Inputs.list(support, query, shots)
  model = api.load(workdir, config=config, overrides=overrides)
  return run(model, inputs, out=out, mode=mode, batch_size=batch_size, progress=progress, stdout=stdout,
             stderr=stderr)


class Inputs:
  """The listed files of a prediction: class names, support paths per class, query paths, skipped files."""

  def __init__(self, names, class_paths, queries, skipped):
    self.names, self.class_paths, self.queries, self.skipped = names, class_paths, queries, skipped

  @classmethod
  def list(cls, support: str, query: str, shots: int | None = None) -> "Inputs":
    names, class_paths, skipped = list_support(support, shots)
    queries, skipped_q = list_queries(query)
    return cls(names, class_paths, queries, skipped + skipped_q)


def run(model: "api.Model", inputs: Inputs, *, out: str | None = None, mode: str | None = None,
        batch_size: int = api.DEFAULT_BATCH, progress: bool = True,
        stdout=None, stderr=None) -> dict:
  """Predicts every query of `inputs` with `model`; writes the JSON lines (stdout or `out`) and the
  summary line (stderr); returns the summary. The supports are decoded before any query."""
  from fewshot_jax import files  # pylint: disable=import-outside-toplevel
  stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
  check_out(out)
  mode = model.check_mode(mode)
  start = time.time()
  names, class_paths, queries, skipped = inputs.names, inputs.class_paths, inputs.queries, inputs.skipped
  if skipped:
    shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    print(f"warning: skipped {len(skipped)} file(s) that are not images: {shown}", file=stderr)
  support_paths = [p for paths in class_paths for p in paths]
  labels = [i for i, paths in enumerate(class_paths) for _ in paths]
  model.check_labels(labels, len(labels))  # the method's way limit, before any decoding
  support_images = model.read_images(support_paths)
  batch = min(batch_size, len(queries))
  chunks = [queries[i:i + batch] for i in range(0, len(queries), batch)]
  bar = _progress(len(queries), stderr, progress)
  predicted = []
  with bar:  # closed (its line ended) before an error propagates: `error: ...` starts a line of its own
    for chunk_labels, chunk_probs in model.predict_batches(
        support_images, labels, (model.read_images(c) for c in chunks), mode=mode,
        batch_size=batch):
      predicted.append((chunk_labels, chunk_probs))
      bar.update(len(chunk_labels))
  lines, counts = [], [0] * len(names)
  flat = [(l, p) for chunk_labels, chunk_probs in predicted for l, p in zip(chunk_labels, chunk_probs)]
  for path, (label, probs) in zip(queries, flat):
    counts[label] += 1
    lines.append(json.dumps({"path": path, "label": names[label],
                             "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)}}) + "\n")
  if out:
    files.write_atomic(out, "".join(lines))
  else:
    stdout.write("".join(lines))
    stdout.flush()
  seconds = time.time() - start
  shot_counts = [len(p) for p in class_paths]
  summary = {"workdir": model.workdir, "method": model.method.name, "mode": mode, "step": model.step,
             "checkpoint": model.config.eval.checkpoint, "ways": len(names),
             "shots": shot_counts[0] if len(set(shot_counts)) == 1 else dict(zip(names, shot_counts)),
             "queries": len(queries), "predicted": dict(zip(names, counts)), "skipped_files": len(skipped),
             "out": out or "stdout", "seconds": round(seconds, 2),
             "images_per_second": round(len(queries) / max(seconds, 1e-9), 1)}
  print(json.dumps({"summary": summary}), file=stderr)
  return summary


class _NoBar:

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, n):
    pass


def _progress(total: int, stream, enabled: bool):
  if not enabled:
    return _NoBar()
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _NoBar()
  return tqdm(total=total, unit="img", desc="predict", file=stream, mininterval=0.5)
