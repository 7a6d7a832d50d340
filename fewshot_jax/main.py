"""The launcher: `fewshot-jax --config=<method>:<preset> --workdir=DIR --mode=...`.

The `fewshot-jax` command of an installed package and a checkout's `python
launch.py` both run `run()`. --config takes a packaged config by name
(`<method>:<preset>`) or a config file by path (`configs/<method>.py:<preset>`,
`my_config.py:<preset>`). With no flags it runs the main job on the default,
configs/default.py (a method on a generated dataset: no files needed), train
then evaluate.
"""

import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fewshot_jax import xla_setup

_XLA_NOTES = xla_setup.set_cpu_defaults()  # before anything creates a JAX backend; logged in main()

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # = config.CONFIG_DIR
_DEFAULT_CONFIG = os.path.join(_CONFIG_DIR, "default.py")  # its get_config's default preset



def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _one_line(e: BaseException) -> str:
  """The user-facing part of an error: the message of the FewshotError behind it, if any.

  ml_collections re-raises a config file's error with the formatted traceback
  as its text, so the message is also searched for in the text.
  """
  from fewshot_jax.errors import FewshotError  # pylint: disable=g-import-not-at-top
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  for exc in chain:
    for line in reversed(str(exc).splitlines()):
      if line.startswith("fewshot_jax.errors."):
        return line.split(": ", 1)[1]
    if isinstance(exc, FewshotError):
      return str(exc)
  text = str(chain[-1]).replace("\\n", "\n").replace("\\'", "'")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)


_TYPE_WORDS = (("could not convert string to float", "a number"), ("invalid literal for int()", "an integer"))


def _config_arg(argv) -> str:
  for arg in argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return _DEFAULT_CONFIG


def _valid_keys(key: str, argv) -> str:
  """The keys beside config key `key` (a.b.c -> the keys of a.b), from the config the user chose."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    path, _, preset = _config_arg(argv).partition(":")
    node = config_lib.load_file(path, preset) if preset else config_lib.load_module(path).get_config()
    prefix = []
    for part in key.split(".")[:-1]:  # down to the first part that does not exist
      if part not in node:
        break
      node = node[part]
      prefix.append(part)
    return ", ".join(sorted(".".join(prefix + [k]) for k in node.keys()))
  except Exception:  # pylint: disable=broad-exception-caught
    return "see configs/*.py"


def _override_problem(e: BaseException, argv) -> str:
  """An override that names no config key: say which, and the keys valid there."""
  text = _one_line(e)
  for arg in argv[1:]:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config."):].split("=", 1)[0]
      if any(f"'{part}'" in text for part in key.split(".")):
        return f"--config.{key}: no such config key; valid here: {_valid_keys(key, argv)}"
  return f"bad --config override: {text}"


def _flag_problem(e: BaseException, argv) -> str:
  """One line naming the flag or config key, the bad value and what would be valid."""
  text = str(e)
  unknown = re.match(r"Unknown command line flag '(config\.[\w.]+)'", text)
  if unknown:
    key = unknown.group(1)[len("config."):]
    return f"--config.{key}: no such config key; valid here: {_valid_keys(key, argv)}"
  bad = re.match(r"flag (--[\w.]+)=(.*?): (.*)$", text, re.S)
  if bad and bad.group(1) != "--config":  # a config file's own error is found by _one_line
    flag, value, why = bad.groups()
    for needle, kind in _TYPE_WORDS:
      if needle in why:
        return f"{flag}={value} is not valid: {flag[2:]} takes {kind}"
    return f"{flag}={value} is not valid: {why.splitlines()[0]}"
  return _one_line(e)


try:  # overrides (--config.a.b=v) are applied while the flag is defined
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file and preset, FILE:PRESET.",
                                  lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as err:
  _fail(_override_problem(err, sys.argv))
flags.DEFINE_string("workdir", os.path.join("workdirs", "default"), "Checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train_eval", ["train", "eval", "train_eval", "convert", "compare", "export", "predict"],
                  "What to run. convert: --torch_checkpoint (a PyTorch state_dict in the authors' "
                  "format) -> an orbax checkpoint in --workdir; compare: evaluate the workdir's model in JAX and PyTorch on "
                  "the same episodes; export: the workdir's model -> --torch_checkpoint, a PyTorch "
                  "state_dict in the authors' format; predict: the workdir's model classifies --query images "
                  "given --support (docs/running.md).")
flags.DEFINE_string("torch_checkpoint", None, "PyTorch file read by --mode=convert or written by "
                    "--mode=export (the key layouts: methods/*_torch.py).")
flags.DEFINE_bool("overwrite", False, "With --mode=convert: replace the checkpoints a workdir already holds.")
flags.DEFINE_bool("distributed", False, "Several processes (a pod, multi-GPU, N processes on one machine): "
                  "join a JAX cluster first. Slurm, Open MPI, Kubernetes and Cloud TPU are detected; "
                  "elsewhere give --coordinator_address, --num_processes and --process_id.")
flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes take part.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 .. num_processes - 1.")
flags.DEFINE_list("local_device_ids", None, "With --distributed: the local devices this process uses "
                  "(e.g. 0 for one GPU per process); default all visible.")
flags.DEFINE_float("stuck_timeout", 600.0, "With several processes: a phase (a training call, validation, "
                   "evaluation, a checkpoint) that has not completed after this many seconds ends every process "
                   "with one line (a peer stuck in a collective); 0: never. Raise it for phases that take longer.")
flags.DEFINE_float("peer_timeout", 40.0, "With several processes: a peer whose heartbeat (written every few "
                   "seconds through the coordinator) is this many seconds old is taken as lost (killed, stopped, its host gone) "
                   "and every process ends with one line, exit 75.")
flags.DEFINE_string("support", None, "With --mode=predict: a folder with one folder of images per class "
                    "(the folder names are the class names).")
flags.DEFINE_string("query", None, "With --mode=predict: the images to classify: comma-separated folders "
                    "(searched recursively), globs ('shots/*.jpg', quoted) or files.")
flags.DEFINE_string("out", None, "With --mode=predict: write the JSON lines to this file (atomically) "
                    "instead of stdout.")
flags.DEFINE_string("predict_mode", None, "With --mode=predict: one of the method's prediction modes (the "
                    "`modes` of --mode=eval's result); default the checkpoint mode.")
flags.DEFINE_integer("predict_batch", 128, "With --mode=predict: query images per compiled call.")
flags.DEFINE_integer("shots", None, "With --mode=predict: use the first K images (by name) of each class; "
                     "default all, the counts may differ.")
FLAGS = flags.FLAGS


class _QuietLibraries:
  """Drops INFO records of orbax and TFDS, which log every file they touch, and orbax's tracebacks of
  a full disk, which the trainer reports as one error line (checkpoint._write_errors)."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    if "/orbax/" in record.pathname and "No space left on device" in (
        record.getMessage() + str(record.exc_info[1] if record.exc_info else "")):
      return False
    return record.levelno > logging.converter.STANDARD_INFO or not any(
        n in record.pathname for n in noisy)


def _parse_flags(argv):
  """absl's parser, but a bad preset or config value is one `error:` line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(_flag_problem(e, argv))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # an override of the chosen --config
    _fail(_override_problem(e, argv))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])!r}: the launcher takes only flags (--name=value); see --help")
  from fewshot_jax.errors import FewshotError  # pylint: disable=g-import-not-at-top
  from fewshot_jax import multihost  # pylint: disable=g-import-not-at-top
  cluster = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.local_device_ids)
  if not FLAGS.distributed and any(v is not None for v in cluster):
    _fail("--coordinator_address, --num_processes, --process_id and --local_device_ids need --distributed")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  for note in _XLA_NOTES:
    logging.info(note)
  from fewshot_jax import compat  # pylint: disable=g-import-not-at-top
  outside = compat.outside_tested_range()
  if outside:
    logging.warning(outside)
  # "Unable to initialize backend 'tpu'" on every machine without one: not news.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  if FLAGS.distributed:
    try:
      ids = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
    except ValueError:
      _fail(f"--local_device_ids={','.join(FLAGS.local_device_ids)} must be device numbers, e.g. 0 or 0,1")
    try:
      multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, ids)
    except FewshotError as e:
      _fail(str(e))
    multihost.setup_logging()
  try:
    config = FLAGS.config
    config.method  # pylint: disable=pointless-statement; a missing config file is reported here
  except OSError as e:
    from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    _fail(f"cannot load --config: {_one_line(e)}; packaged configs: {', '.join(config_lib.packaged_configs())} "
          "(--config=NAME:PRESET) or a config file's path")
  if not FLAGS.stuck_timeout >= 0:
    _fail(f"--stuck_timeout={FLAGS.stuck_timeout} must be >= 0 seconds (0: never)")
  from fewshot_jax import watchdog  # pylint: disable=g-import-not-at-top
  if not FLAGS.peer_timeout >= 5 * watchdog.Settings.heartbeat_every:
    _fail(f"--peer_timeout={FLAGS.peer_timeout} must be >= {5 * watchdog.Settings.heartbeat_every:g} seconds "
          "(5 heartbeats)")
  settings = watchdog.Settings(stuck_timeout=FLAGS.stuck_timeout, peer_timeout=FLAGS.peer_timeout)
  with watchdog.watching(settings) as watch:
    _run_mode(config, watch)


def _run_mode(config, watch):
  """The --mode's work; every error a user can cause is one line, exit 2."""
  import jax  # pylint: disable=g-import-not-at-top
  from fewshot_jax import evaluate  # pylint: disable=g-import-not-at-top
  from fewshot_jax import train  # pylint: disable=g-import-not-at-top
  from fewshot_jax.errors import FewshotError  # pylint: disable=g-import-not-at-top
  from fewshot_jax import multihost  # pylint: disable=g-import-not-at-top
  from fewshot_jax import preemption  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode in ("convert", "export", "compare", "predict") and config.eval.get("data", ""):
      _fail(f"--config.eval.data={config.eval.data!r} is read by --mode=eval and train_eval only; "
            f"--mode={FLAGS.mode} uses the training data.* (drop the flag)")
    if FLAGS.mode == "convert":
      if not FLAGS.torch_checkpoint:
        _fail("--mode=convert needs --torch_checkpoint=PATH")
      from fewshot_jax import convert  # pylint: disable=g-import-not-at-top
      print(json.dumps(convert.convert_to_workdir(config, FLAGS.torch_checkpoint, FLAGS.workdir,
                                                  overwrite=FLAGS.overwrite)))
    if FLAGS.mode == "export":
      if not FLAGS.torch_checkpoint:
        _fail("--mode=export needs --torch_checkpoint=PATH (the file to write)")
      from fewshot_jax import convert  # pylint: disable=g-import-not-at-top
      print(json.dumps(convert.export_checkpoint(config, FLAGS.workdir, FLAGS.torch_checkpoint)))
    if FLAGS.mode == "compare":
      from fewshot_jax import compare  # pylint: disable=g-import-not-at-top
      with watch.phase("the comparison"):
        result = compare.compare_checkpoint(config, FLAGS.workdir)
      print(compare.format_table(result))
    if FLAGS.mode == "predict":
      _predict(config)
    if FLAGS.mode in ("train", "train_eval"):
      train.train_and_evaluate(config, FLAGS.workdir, watch=watch)
    if FLAGS.mode in ("eval", "train_eval"):
      result = evaluate.evaluate_checkpoint(config, FLAGS.workdir, watch=watch)
      if multihost.is_main():
        print(json.dumps(result))
  except FewshotError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # a file the run writes: a full disk, a permission, a missing directory
    print(f"error: cannot write {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
    sys.exit(2)
  except preemption.Stopped as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint
    print("interrupted: stopped at once without a checkpoint; the latest one remains", file=sys.stderr)
    sys.exit(130)
  except jax.errors.JaxRuntimeError as e:  # a collective failed: with several processes, a peer is gone
    if jax.process_count() > 1:
      from fewshot_jax import watchdog  # pylint: disable=g-import-not-at-top
      text = " ".join(str(e).split())
      watch.end_now(watchdog.EXIT_PEER_LOST, f"error: a collective failed ({text[:160]}): a peer process is "
                    "gone or unreachable")
    raise


def _predict(config):
  """--mode=predict: the workdir's config.json unless --config is given; --config.KEY=V overrides apply
  to either (without --config, only keys the default config also has parse)."""
  from fewshot_jax import predict  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    _fail("--mode=predict runs in one process; drop --distributed")
  if not FLAGS.support or not FLAGS.query:
    _fail("--mode=predict needs --support=DIR (one folder of images per class) and --query=DIR, GLOB or "
          "FILE[,FILE...] (the images to classify)")
  overrides = None
  if not FLAGS["config"].present:
    keys = [a[len("--config."):].split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
    overrides = {k: _config_value(config, k) for k in keys}
    config = None
  predict.main(FLAGS.workdir, FLAGS.support, FLAGS.query, config=config, overrides=overrides, out=FLAGS.out,
               mode=FLAGS.predict_mode, batch_size=FLAGS.predict_batch, shots=FLAGS.shots)


def _config_value(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _packaged_config_args(argv: list[str]) -> list[str]:
  """argv with `--config=<name>:<preset>` (or `--config <name>:<preset>`) naming the packaged file."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + config_lib.resolve_config_arg(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = config_lib.resolve_config_arg(out[i + 1])
  return out


def run():
  """The `fewshot-jax` console script and launch.py."""
  sys.argv = _packaged_config_args(sys.argv)  # before absl parses it (overrides are read from sys.argv)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
