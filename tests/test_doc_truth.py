"""The documents say what the code does: README's Layout names every module, test and benchmark and only
paths that exist; docs/config.md lists every config key with its default; docs/running.md every flag of
launch.py and every key of an evaluation result; README's presets table every preset; README's Python
snippet runs on the main job's model (trained here for 2 steps). (tests/test_docs.py: every command parses.)
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from fewshot_jax import config as config_lib
from fewshot_jax import methods
from fewshot_jax.data import registry
from tests.conftest import REPO
from tests.test_docs import fenced_blocks

README = REPO / "README.md"
# Layout: a line whose text starts at this column or further continues the previous entry's description.
_CONTINUATION = 16
_PATH_EXTENSIONS = ("py", "md", "sh", "txt", "csv", "cfg", "toml", "json")
# Every .py file here (and below, for fewshot_jax) must be named in the Layout block.
_LISTED_DIRS = {"fewshot_jax": True, "benchmarks": False, "tests": False, "configs": False}


def _section(text: str, heading: str) -> str:
  """The text of a `## heading` section, up to the next `## `."""
  start = text.index(f"\n## {heading}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end >= 0 else len(text)]


def _expand_braces(token: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", token)
  if not match:
    return [token]
  return [x for alt in match.group(1).split(",")
          for x in _expand_braces(token[:match.start()] + alt + token[match.end():])]


def read_layout(lines: list[str], root: pathlib.Path = REPO):
  """(named, problems) of a Layout block: `named` the existing paths it names (a directory entry `x/`, a
  file, `test_x` in a folder of tests), `problems` the path-like words that name nothing.

  Indentation is the tree: an entry `name/` opens a folder that the deeper entries below it belong to;
  words on a line (its description and continuation lines included) resolve in the folder of the line
  (a folder entry's own folder), else in a folder above it (`.ci/run` on the docs/ line)."""
  named, problems, stack, context = set(), [], [], root
  for number, line in enumerate(lines, 1):
    indent = len(line) - len(line.lstrip())
    if not line.strip():
      continue
    if indent < _CONTINUATION:  # an entry
      first = line.split()[0]
      while stack and stack[-1][0] >= indent:
        stack.pop()
      context = stack[-1][1] if stack else root
      if first.endswith("/") and (context / first).is_dir():
        context = context / first.rstrip("/")
        stack.append((indent, context))
    for word in re.findall(r"[\w.*{},/-]+", line):
      word = word.rstrip(",.:;")
      is_path = "/" in word or word.rpartition(".")[2] in _PATH_EXTENSIONS and "." in word
      test_name = re.fullmatch(r"test_\w+", word) is not None
      if not (is_path or test_name) or word.startswith("--") or word == "/":
        continue
      candidates = [context, *[p for p in context.parents if p.is_relative_to(root)]]
      found = None
      for folder in candidates:
        alternatives = [folder / (w + ".py" if test_name else w) for w in _expand_braces(word)]
        if "*" in word:
          if all(list(folder.glob(str(a.relative_to(folder)).rstrip("/"))) for a in alternatives):
            found = []  # a glob names no file in particular
            break
        elif all(a.exists() for a in alternatives):
          found = alternatives
          break
      if found is None:
        problems.append(f"Layout line {number}: {word!r} names nothing under {context.relative_to(root)}/ or above")
      else:
        named.update(p.resolve() for p in found)
  return named, problems


def _layout_lines() -> list[str]:
  return fenced_blocks(_section(README.read_text(), "Layout"))[0][1]


def _unnamed(named, root: pathlib.Path = REPO) -> list[str]:
  """Modules, packages, tests and benchmarks of the repository that the Layout leaves out."""
  missing = []
  for folder, recursive in _LISTED_DIRS.items():
    for path in sorted((root / folder).glob("**/*.py" if recursive else "*.py")):
      if path.name == "__init__.py":  # a package is named by its folder entry
        path = path.parent
      if path.resolve() not in named:
        missing.append(str(path.relative_to(root)))
  for path in sorted((root / "benchmarks").glob("*.sh")):
    if path.resolve() not in named:
      missing.append(str(path.relative_to(root)))
  return sorted(set(missing))


def test_the_layout_names_every_module_test_and_benchmark_and_only_paths_that_exist():
  named, problems = read_layout(_layout_lines())
  assert not problems, "\n".join(problems)
  missing = _unnamed(named)
  assert not missing, f"README.md's Layout does not name: {missing}"


def test_the_layout_check_finds_missing_and_made_up_paths(tmp_path):
  (tmp_path / "fewshot_jax" / "data").mkdir(parents=True)
  for name in ("fewshot_jax/__init__.py", "fewshot_jax/a.py", "fewshot_jax/b.py", "fewshot_jax/data/__init__.py",
               "fewshot_jax/data/c.py"):
    (tmp_path / name).write_text("")
  for folder in ("benchmarks", "tests", "configs"):
    (tmp_path / folder).mkdir()
  (tmp_path / "tests" / "test_x.py").write_text("")
  lines = ["fewshot_jax/", "  a.py     does a (b.py elsewhere: see c.py)", "  data/",
           "    gone.py  removed", "tests/   test_x, test_y"]
  named, problems = read_layout(lines, tmp_path)
  assert problems == ["Layout line 2: 'c.py' names nothing under fewshot_jax/ or above",
                      "Layout line 4: 'gone.py' names nothing under fewshot_jax/data/ or above",
                      "Layout line 5: 'test_y' names nothing under tests/ or above"]
  assert _unnamed(named, tmp_path) == ["fewshot_jax/data/c.py"]  # b.py is named in a.py's description


# ---------------------------------------------------------------- docs/config.md


def config_tables(text: str) -> dict[str, dict[str, str]]:
  """{heading: {key: default cell}} of every `| key | default | meaning |` table of a document."""
  tables, heading = {}, None
  for line in text.splitlines():
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
      tables.setdefault(heading, {})
    elif line.startswith("|") and not re.fullmatch(r"\|[-|: ]+\|", line.strip()):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if cells[0] == "key":
        continue
      key = re.fullmatch(r"`([\w.]+)`", cells[0])
      assert key and len(cells) == 3 and cells[2], f"docs/config.md row {line!r}: | `key` | default | meaning |"
      assert key.group(1) not in tables[heading], f"{key.group(1)} twice under {heading!r}"
      tables[heading][key.group(1)] = cells[1]
  return tables


def _value(text: str):
  """A Python literal or an arithmetic expression of numbers (`2 / 3`)."""
  def value(node):
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.Tuple):
      return tuple(value(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -value(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
      return {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}[type(node.op)](value(node.left), value(node.right))
    raise ValueError(ast.dump(node))
  return value(ast.parse(text, mode="eval").body)


def default_matches(cell: str, value) -> bool:
  """Whether a default cell (`value` in a code span) states `value`: strings bare or quoted (`~` expanded)."""
  span = re.fullmatch(r"`([^`]+)`", cell)
  if not span:
    return False
  text = span.group(1)
  try:
    literal = _value(text)
  except (SyntaxError, ValueError):
    literal = object()
  if isinstance(value, str):
    return value in (text, os.path.expanduser(text)) or literal == value
  if isinstance(value, (bool, type(None))):
    return literal is value
  if isinstance(value, (tuple, list)):
    return isinstance(literal, tuple) and literal == tuple(value)
  return isinstance(literal, (int, float)) and not isinstance(literal, bool) and literal == value


_BASE_SECTIONS = ("data", "model", "augment", "episode", "train", "eval", "method")
_OPTIONS = "data: dataset options"


def _preset_values() -> dict[tuple[str, str], set]:
  """{(method name, key): {repr of its value in each preset of configs/*.py}}."""
  values = {}
  for path in sorted((REPO / "configs").glob("*.py")):
    module = config_lib.load_module(str(path))
    for preset in module.PRESETS:
      c = module.get_config(preset)
      for key, value in c.method.items():
        if key != "name":
          values.setdefault((c.method.name, key), set()).add(repr(tuple(value) if isinstance(value, list) else value))
  return values


def config_problems(text: str, base, datasets, method_keys: dict, preset_values: dict) -> list[str]:
  """What docs/config.md's tables get wrong against the code."""
  tables, problems = config_tables(text), []
  documented = {k: v for s in _BASE_SECTIONS for k, v in tables.get(s, {}).items()}
  keys = {f"{s}.{k}": v for s, section in base.items() for k, v in section.items()}
  problems += [f"{k}: not in docs/config.md" for k in sorted(set(keys) - set(documented))]
  problems += [f"{k}: in docs/config.md but not a key of base_config()" for k in sorted(set(documented) - set(keys))]
  problems += [f"{k}: default {documented[k]} but base_config() has {v!r}" for k, v in keys.items()
               if k in documented and not default_matches(documented[k], v)]
  options = tables.get(_OPTIONS, {})
  offered = {f"data.{k}": v for d in datasets for k, v in d.options.items()}
  problems += [f"{k}: dataset option not in docs/config.md" for k in sorted(set(offered) - set(options))]
  problems += [f"{k}: no dataset has this option" for k in sorted(set(options) - set(offered))]
  problems += [f"{k}: default {options[k]} but the record has {v!r}" for k, v in offered.items()
               if k in options and not default_matches(options[k], v)]
  for name, declared in method_keys.items():
    if name not in tables:
      problems.append(f"no `### {name}` section")
      continue
    rows, want = tables[name], {f"method.{k}" for k in declared}
    problems += [f"{name} {k}: not in docs/config.md" for k in sorted(want - set(rows))]
    problems += [f"{name} {k}: not in the method's KEYS" for k in sorted(set(rows) - want)]
    for key in sorted(want & set(rows)):
      values = preset_values.get((name, key.split(".", 1)[1]), set())
      if len(values) > 1:
        if rows[key] != "preset":
          problems.append(f"{name} {key}: presets set {sorted(values)}, so the default is 'preset', not {rows[key]}")
      elif not values or not default_matches(rows[key], _value(next(iter(values)))):
        problems.append(f"{name} {key}: default {rows[key]} but the configs set {sorted(values)}")
  return problems


@pytest.fixture
def base(monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)  # data.data_dir's documented default
  return config_lib.base_config()


def _method_keys() -> dict:
  return {name: methods.module(name).KEYS for name in methods.METHODS}


def test_config_md_lists_every_key_with_its_default(base):
  problems = config_problems((REPO / "docs" / "config.md").read_text(), base, registry.DATASETS, _method_keys(),
                             _preset_values())
  assert not problems, "\n".join(problems)


def test_the_config_check_finds_missing_extra_and_wrong_keys(base):
  text = (REPO / "docs" / "config.md").read_text()
  mutations = [
      ("| `train.min_lr` | `0.0` |", "| `train.min_lrate` | `0.0` |",
       ["train.min_lr: not in docs/config.md", "train.min_lrate: in docs/config.md but not a key of base_config()"]),
      ("| `train.lr` | `0.001` |", "| `train.lr` | `0.01` |", ["train.lr: default `0.01` but base_config() has 0.001"]),
      ("| `data.split_seed` | `0` |", "| `data.split_seed` | `1` |", ["data.split_seed: default `1` but the record has 0"]),
      ("| `method.cosine_scale` | preset |", "| `method.cosine_scale` | `1.0` |",
       ["lgmnet method.cosine_scale: presets set ['1.0', '10.0'], so the default is 'preset', not `1.0`"]),
      ("| `method.z_dim` | `32` |", "| `method.z_dim` | `16` |",
       ["lgmnet method.z_dim: default `16` but the configs set ['32']"]),
  ]
  for old, new, expected in mutations:
    assert text.count(old) == 1, old
    assert config_problems(text.replace(old, new), base, registry.DATASETS, _method_keys(), _preset_values()) \
        == expected, old
  keys = dict(_method_keys(), matchingnet=("cosine_scale", "eps", "temperature"))
  assert config_problems(text, base, registry.DATASETS, keys, _preset_values()) == [
      "matchingnet method.temperature: not in docs/config.md"]


def test_config_md_is_linked():
  assert "(docs/config.md)" in _section(README.read_text(), "Configs and the launcher")
  assert "(config.md)" in (REPO / "docs" / "running.md").read_text()


# ---------------------------------------------------------------- launch.py's flags, presets


def launch_module_flags() -> list[str]:
  """The flags launch.py itself defines (not absl's or a library's), from importing it in a subprocess."""
  probe = ("import json; from fewshot_jax import main; "
           "print(json.dumps([f.name for f in main.FLAGS.flags_by_module_dict()['fewshot_jax.main']]))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True,
                       timeout=120).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_running_md_documents_every_flag_of_launch_py():
  flags = launch_module_flags()
  assert {"config", "workdir", "mode", "support", "stuck_timeout"} <= set(flags)
  table = _section((REPO / "docs" / "running.md").read_text(), "Flags")
  documented = re.findall(r"^\| `--(\w+)", table, re.M)
  assert sorted(documented) == sorted(flags), (sorted(set(flags) - set(documented)),
                                               sorted(set(documented) - set(flags)))


def test_readme_presets_table_names_every_preset():
  """Each row's config files: every preset is in the row, every preset-like name of the row is a preset."""
  table = _section(README.read_text(), "Configs and the launcher")
  rows = [l for l in table.splitlines() if l.startswith("| `configs/")]
  assert rows
  covered = set()
  for row in rows:
    files_cell, presets_cell = row.strip("|").split("|")[:2]
    files = re.findall(r"`(configs/\w+\.py)`", files_cell)
    named = set(re.findall(r"`([\w-]+)`", presets_cell))
    presets = {f: set(config_lib.load_module(str(REPO / f)).PRESETS) for f in files}
    for file, own in presets.items():
      assert own <= named, (file, sorted(own - named))
    assert named <= set().union(*presets.values()), sorted(named - set().union(*presets.values()))
    covered.update(files)
  listed = {f"configs/{p.name}" for p in (REPO / "configs").glob("*.py")} - {"configs/default.py"}
  assert covered == listed, sorted(listed ^ covered)


# ---------------------------------------------------------------- the Python snippet, result keys


def test_readme_python_snippet_runs_on_the_main_jobs_model(tmp_path, prepared_dir, monkeypatch):
  """`python launch.py` (the main job) at toy length in tmp_path, then README's snippet, as written, in
  tmp_path: its "workdirs/default" is that run's workdir. The run's eval_test.json entry has exactly the
  keys docs/running.md lists."""
  toy = {"train.steps": 2, "train.eval_every": 2, "train.log_every": 2, "train.steps_per_call": 2,
         "train.checkpoint_every": 2, "eval.val_episodes": 2, "eval.episodes": 4, "eval.tasks": 2,
         "episode.train_ways": 5, "data.data_dir": prepared_dir}
  run = subprocess.run([sys.executable, str(REPO / "launch.py"), *(f"--config.{k}={v}" for k, v in toy.items())],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ))
  assert run.returncode == 0, run.stderr[-3000:]
  snippet = re.search(r"```python\n(.*?)```", _section(README.read_text(), "Predicting on your own images"), re.S)
  assert snippet and 'fewshot_jax.load("workdirs/default")' in snippet.group(1)
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(snippet.group(1), "README.md (Predicting on your own images)", "exec"), scope)  # pylint: disable=exec-used
  labels, probs, queries = scope["labels"], scope["probs"], len(scope["query"])
  assert all(g.shape == (20, 28, 28) and g.dtype == np.uint8 for g in scope["glyphs"])  # as its comment says
  assert isinstance(labels, np.ndarray) and labels.shape == (queries,) and set(labels.tolist()) <= {0, 1, 2}
  assert isinstance(probs, np.ndarray) and probs.shape == (queries, 3)
  np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
  np.testing.assert_array_equal(labels, probs.argmax(1))
  assert scope["model"].step == 2

  entry, = json.loads((tmp_path / "workdirs" / "default" / "eval_test.json").read_text()).values()
  listed = re.search(r"entry has `([^`]+)` and `(\w+)`", " ".join((REPO / "docs" / "running.md").read_text().split()))
  assert listed, "docs/running.md no longer lists the result keys as 'entry has `a, b, ...` and `modes`'"
  assert sorted(listed.group(1).split(", ") + [listed.group(2)]) == sorted(entry)
