"""The repo's promises about itself: CI runs the README's test command; every preset of every config file
is valid."""

import json
import re

import pytest

from fewshot_jax import config as config_lib
from fewshot_jax.data import registry
from fewshot_jax.errors import ConfigError
from tests.conftest import REPO, load_config

CONFIG_FILES = sorted((REPO / "fewshot_jax" / "configs").glob("*.py"))
PRESETS = [(path.name, preset) for path in CONFIG_FILES for preset in config_lib.load_module(str(path)).PRESETS]


def test_ci_runs_the_readme_test_command():
  readme = (REPO / "README.md").read_text()
  command = re.search(r"pip install -e '\.\[test\]' && FEWSHOT_DATA_DIR=\S+ (python -m pytest[^\n]*)",
                      readme).group(1)
  ci = (REPO / ".ci" / "run").read_text()
  assert command in ci.splitlines()


def test_every_config_file_has_presets():
  assert {path.name for path in CONFIG_FILES} == {"default.py", "protonet.py", "matchingnet.py", "lgmnet.py",
                                                  "idemenet.py"}
  assert {file for file, _ in PRESETS} == {path.name for path in CONFIG_FILES}  # none without a preset


@pytest.mark.parametrize("file, preset", PRESETS)
def test_every_preset_is_valid(file, preset, tmp_path):
  """Every preset of every config file validates (config.validate: shared keys and the method's own),
  names the dataset of its prefix and the method of its file, trains the task its name says and is
  evaluated on 600 test episodes of 15 queries. IDeMe-Net's stage-2 presets ship method.pretrained
  empty (the user's stage-1 workdir): loading refuses it by name, and they validate once it is set."""
  path = REPO / "fewshot_jax" / "configs" / file
  c = config_lib.validate(config_lib.load_file(str(path), preset))
  prefix, _, task = preset.partition("-")
  if preset == "pretrain":
    prefix, task = "mini", "pretrain"
  assert c.data.name == registry.by_preset(prefix).name
  method = {"default.py": "protonet", "idemenet.py": "idemenet_pretrain" if task == "pretrain" else "idemenet"}
  assert c.method.name == method.get(file, path.stem)
  if task not in ("", "pretrain"):
    ways, shots = map(int, task.rstrip("s").split("w"))
    assert (c.episode.ways, c.episode.shots) == (ways, shots)
  assert c.eval.episodes == 600 and c.eval.queries == 15 and c.eval.split == "test"
  if c.method.name.startswith("idemenet"):
    assert c.method.num_classes == registry.by_preset(prefix).base_classes
  if c.method.name == "idemenet":
    from fewshot_jax.methods import idemenet  # pylint: disable=g-import-not-at-top
    assert c.method.pretrained == ""
    with pytest.raises(ConfigError, match="method.pretrained is empty"):
      idemenet.load_into(c, variables=None)
    c.method.pretrained = str(tmp_path / "stage1")
    config_lib.validate(c)
    stage1 = config_lib.load_file(str(path), "pretrain" if prefix == "mini" else f"{prefix}-pretrain")
    for key in ("model.backbone", "method.num_classes", "method.grid", "data.input_size", "data.name"):
      section, name = key.split(".")
      assert c[section][name] == stage1[section][name], key  # stage 2 loads what stage 1 trained


def test_steps_benchmark_reports_compiled_cost(tmp_path):
  """benchmarks/steps.py cannot rot: a small case in both dtypes, compiled (the run columns:
  test_accelerator.py, whose smoke mode runs it)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = tmp_path / "steps.json"
  subprocess.run([sys.executable, str(REPO / "benchmarks" / "steps.py"), "--cases=protonet:synthetic",
                  "--per_class=20", "--remats=False", "--norun", f"--json={out}"],
                 check=True, capture_output=True, timeout=300)
  rows = json.loads(out.read_text())
  assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
  for r in rows:
    assert r["flops"] > 1e9 and r["batch"] == 2  # 2 tasks of 20-way 1-shot 5-query 28x28 episodes
    assert r["peak_estimate_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    assert r["images_per_step"] == 2 * 20 * 6 and "ms_per_step" not in r
  assert rows[1]["temp_bytes"] < rows[0]["temp_bytes"]  # bfloat16 activations take less room


_METHOD_NAMES = re.compile(r"idemenet|lgmnet|protonet|matchingnet|IDeMe|LGM"
                           # and what describes one method's parts instead of naming it
                           r"|weight.generator|deformation|meta.?net|gnet|patch.?mix|soft.?random|TF code",
                           re.IGNORECASE)
_METHOD_HOMES = ("methods", "models", "torch_reference", "configs")


def test_no_method_is_named_outside_its_own_files():
  """Entry points and shared modules learn what a method can do from its Method record: no method
  name, no description of one method's parts ('the weight generator', 'the deformation network',
  'patch mixing', ...) and no getattr on a method outside methods/, models/, torch_reference/ and
  configs/."""
  files = [REPO / "launch.py"] + [p for p in sorted((REPO / "fewshot_jax").rglob("*"))
                                  if p.is_file() and p.suffix in (".py", ".txt", ".csv", ".md")
                                  and p.relative_to(REPO / "fewshot_jax").parts[0] not in _METHOD_HOMES]
  hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
          for i, line in enumerate(p.read_text().splitlines(), 1)
          if _METHOD_NAMES.search(line) or "getattr(method" in line]
  assert not hits, "\n".join(hits)


_DATASET_NAMES = re.compile(r"omniglot|mini_?imagenet|synthetic|cifar[-_]?fs|fc100|tiered_?imagenet|\bcub\b|"
                            r"image_?folder", re.IGNORECASE)


def test_no_dataset_is_named_outside_data():
  """Configs, builders and methods learn what a dataset is from its Dataset record (data/registry.py): no
  dataset name outside data/, configs/, tests/, benchmarks/ and the docs (setup.cfg's line listing
  data/'s package files is data/'s own)."""
  package = REPO / "fewshot_jax"
  files = [REPO / name for name in ("launch.py", "setup.cfg", "pyproject.toml", ".ci/run")] + [
      p for p in sorted(package.rglob("*"))
      if p.is_file() and p.suffix in (".py", ".txt", ".csv", ".md")
      and p.relative_to(package).parts[0] not in ("data", "configs")]
  hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
          for i, line in enumerate(p.read_text().splitlines(), 1)
          if _DATASET_NAMES.search(line) and not line.startswith("fewshot_jax.data =")]
  assert not hits, "\n".join(hits)


def test_dataset_records_are_whole(tmp_path):
  """Every registered record: a unique name and preset prefix, statistics per channel (or none: the prepared
  data's), base classes (or 0 where only the files tell), and a builder that stores images of the record's
  size and channels."""
  records = registry.DATASETS
  assert len({d.name for d in records}) == len({d.preset for d in records}) == len(records)
  for d in records:
    assert d.schemes and len(d.mean) == len(d.std) and len(d.mean) in (0, d.channels)
    assert 0 < d.base_classes or (d.base_classes == 0 and d.folder is None and not d.generated)
    builder = d.make_builder(scheme=d.schemes[0], image_size=d.image_size, data_dir=tmp_path)
    assert builder.info.features["image"].shape == (d.image_size, d.image_size, d.channels), d.name


def _preset_data() -> dict:
  """{'file:preset': data.* but data_dir, with method.num_classes where set} of every preset of every config
  file, $FEWSHOT_DATA_DIR being /data (the caller sets it)."""
  out = {}
  for path in sorted((REPO / "configs").glob("*.py")):
    for preset in config_lib.load_module(str(path)).PRESETS:
      c = json.loads(config_lib.load_file(str(path), preset).to_json())
      out[f"{path.name}:{preset}"] = {f"data.{k}": v for k, v in c["data"].items() if k != "data_dir"}
      if "num_classes" in c["method"]:
        out[f"{path.name}:{preset}"]["method.num_classes"] = c["method"]["num_classes"]
  return out


def test_train_schedules_and_optimizers_checked_are_those_built():
  from fewshot_jax import state  # pylint: disable=g-import-not-at-top
  assert tuple(state.SCHEDULES) == config_lib.SCHEDULES and tuple(state.OPTIMIZERS) == config_lib.OPTIMIZERS


def test_every_preset_keeps_its_data(monkeypatch):
  """tests/preset_data.json, written before the datasets became records, holds each preset's data.* (and
  base-class count): the records give every preset the same. A deliberate change to one rewrites the
  file from _preset_data(); presets added since are not in it."""
  monkeypatch.setenv("FEWSHOT_DATA_DIR", "/data")
  expected = json.loads((REPO / "tests" / "preset_data.json").read_text())
  got = _preset_data()
  changed = [(k, got.get(k), v) for k, v in expected.items() if got.get(k) != v]
  assert not changed, changed


def test_data_imports_no_config():
  """The layering: config reads data/'s registry, never the other way."""
  hits = [p.name for p in sorted((REPO / "fewshot_jax" / "data").glob("*.py"))
          if _imports(p, {"fewshot_jax.config"})]
  assert not hits, hits


def _imports(path, modules):
  """fewshot_jax modules that `path` imports anywhere (top level or inside functions)."""
  import ast  # pylint: disable=g-import-not-at-top
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                   for a in node.names)
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
          and isinstance(node.args[0], ast.JoinedStr)):  # importlib.import_module(f"pkg.{name}..."): all of pkg
      prefix = "".join(v.value for v in node.args[0].values if isinstance(v, ast.Constant))
      found.update(m for m in modules if m.startswith(prefix) and m != prefix.rstrip("."))
  return {m for m in found if m in modules}


def test_no_import_loop():
  """The package's modules import each other without a cycle, counting imports inside functions
  (a lazy import hides a loop; it does not remove it)."""
  root = REPO / "fewshot_jax"
  paths = {".".join(("fewshot_jax",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
           for p in root.rglob("*.py")}
  graph = {m: _imports(p, paths) - {m} for m, p in paths.items()}
  state = {}

  def visit(m, trail):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", " -> ".join(trail[trail.index(m):] + [m])
    state[m] = "open"
    for n in sorted(graph[m]):
      visit(n, trail + [m])
    state[m] = "done"

  for m in sorted(graph):
    visit(m, [])


@pytest.mark.parametrize("method, preset, key, value, needles", [
    ("matchingnet", "synthetic", "method.cosine_scal", 1.0, ("method.cosine_scal", "'matchingnet'", "cosine_scale")),
    ("idemenet", "mini-5w1s", "method.lr_deform", 0.1, ("method.lr_deform", "lr_deformation")),
    ("protonet", "synthetic", "method.cosine_scale", 10.0, ("method.cosine_scale", "'protonet'", "valid: ['name']")),
    ("idemenet", "mini-5w1s", "train.lr", 0.01, ("train.lr=0.01", "'idemenet'", "method.*", "0.001")),
    ("idemenet", "mini-5w1s", "train.grad_clip", 1.0, ("train.grad_clip=1.0", "'idemenet'")),
    ("lgmnet", "omniglot-5w1s", "model.backbone", "conv4", ("model.backbone='conv4'", "'lgm_extractor'")),
    ("idemenet", "pretrain", "model.backbone", "resnet50", ("model.backbone='resnet50'", "'resnet18'")),
    ("idemenet", "mini-5w1s", "model.conv_impl", "xl", ("model.conv_impl='xl'", "'xla'")),
    ("lgmnet", "omniglot-5w1s", "model.conv_impl", "xl", ("model.conv_impl='xl'", "'xla'")),
    ("protonet", "synthetic", "train.schedule", "linear", ("train.schedule='linear'", "'constant'", "'cosine'")),
    ("matchingnet", "synthetic", "train.optimizer", "rmsprop", ("train.optimizer='rmsprop'", "'adam'", "'sgd'")),
    ("protonet", "synthetic", "augment.flip_prob", 1.5, ("augment.flip_prob=1.5", "[0, 1]")),
    ("protonet", "synthetic", "eval.protocol", "reference", ("eval.protocol='reference'", "'protonet'", "'standard'")),
    ("lgmnet", "omniglot-5w1s", "eval.protocol", "ref", ("eval.protocol='ref'", "'standard'", "'reference'")),
])
def test_method_keys_are_checked_once_for_every_method(method, preset, key, value, needles):
  """A misspelled method key, a train.* key the method's optimiser ignores, a backbone the method
  does not build and a bad conv_impl are each one ConfigError naming the key and what is valid."""
  c = load_config(method, preset)
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert "\n" not in message and all(n in message for n in needles), message
