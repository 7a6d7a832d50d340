"""Every command the documents show parses: README.md, docs/*.md and benchmarks/RESULTS.md.

In each fenced code block and inline code span, every `python launch.py ...` gets only flags launch.py defines (an
enum flag only its values), its `--config=FILE:PRESET` names a config file and one of its presets,
and every `--config.a.b=v` names a key of that config; every `python benchmarks/X.py ...` names a
script that exists and gets only flags it (or a benchmarks module it imports) defines. Nothing is
run: launch.py's flags come from importing it in a subprocess (main is not called), configs are
loaded with config.load_file, benchmark flags are read from the scripts' DEFINE_ calls.
"""

import functools
import json
import re
import shlex
import subprocess
import sys

import pytest

from fewshot_jax import config as config_lib
from tests.conftest import REPO

DOCUMENTS = sorted([REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", *(REPO / "docs").glob("*.md")])

# Lines to leave unchecked: a substring of the (joined) command line -> why. Keep it short.
SKIP: dict[str, str] = {}

_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
_SEPARATORS = (";", "&&", "||", "&", "|")
_PLACEHOLDER = re.compile(r"[<>$]|\{|\}|\.\.\.")
# Flags every absl program has that are not in FLAGS until app.run defines them.
_ABSL_SPECIAL = frozenset({"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok"})


def fenced_blocks(text: str):
  """(line number of the first line, lines) of every ``` fenced block."""
  blocks, current, start = [], None, 0
  for i, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      if current is None:
        current, start = [], i + 1
      else:
        blocks.append((start, current))
        current = None
    elif current is not None:
      current.append(line)
  return blocks


def code_spans(text: str):
  """(line number, [text]) of every inline `code span` outside fenced blocks (a span may wrap lines)."""
  lines = text.splitlines()
  for first, block in fenced_blocks(text):
    lines[first - 2:first + len(block)] = [""] * (len(block) + 2)  # blank the block and its fences
  prose = "\n".join(lines)
  return [(prose.count("\n", 0, m.start()) + 1, [" ".join(m.group(1).split())])
          for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose)]


def _strip_comment(line: str) -> str:
  """A shell comment: `#` at the start of a word, outside quotes."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i]
  return line


def _tokens(line: str) -> list[str]:
  """Shell words, with a quoted word that holds a command (gcloud --command="...") opened up and
  trailing `;` split off, so that separators are tokens of their own."""
  try:
    words = shlex.split(line)
  except ValueError:  # an unbalanced quote: not a command we can read
    return []
  out = []
  for word in words:
    if " " in word and re.search(r"launch\.py|benchmarks/", word):
      out.extend(_tokens(word.split("=", 1)[1] if word.startswith("--") and "=" in word else word))
    elif word.endswith(";") and word != ";":
      out.extend([word[:-1], ";"])
    else:
      out.append(word)
  return out


def commands(lines: list[str], first_line: int = 1):
  """(line number, script, arguments) of every `python <script>.py ...` in a block's lines.

  Continuation lines (a trailing backslash) are joined; `NAME=value` lines define variables that
  later `$NAME` / `${NAME}` expand to; environment prefixes, `for ...; do`, `&`, `&&` and `;` around
  a command are skipped; a command's arguments end at the next separator or `done`."""
  found, variables, pending, start = [], {}, "", None
  for number, raw in enumerate(lines, first_line):
    line = _strip_comment(raw).rstrip()
    start = number if not pending else start
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    line, pending = pending + line, ""
    assignment = _ASSIGNMENT.match(line.strip())
    if assignment:  # NAME=value or NAME="a value" alone on a line (not NAME=value command ...)
      value = assignment.group(2).strip()
      if re.fullmatch(r"\"[^\"]*\"|'[^']*'", value):
        variables[assignment.group(1)] = value[1:-1]
        continue
      if " " not in value:
        variables[assignment.group(1)] = value
        continue
    for name, value in variables.items():
      line = re.sub(r"\$\{?" + name + r"\b\}?", lambda _: value, line)
    if any(s in line for s in SKIP):
      continue
    tokens = _tokens(line)
    for i, token in enumerate(tokens):
      if token == "fewshot-jax":  # the installed command: launch.py's program
        args = []
        for arg in tokens[i + 1:]:
          if arg in _SEPARATORS or arg == "done":
            break
          args.append(arg)
        found.append((start, "fewshot-jax", args))
      elif i + 1 < len(tokens) and _PYTHON.match(token) and tokens[i + 1].endswith(".py"):
        args = []
        for arg in tokens[i + 2:]:
          if arg in _SEPARATORS or arg == "done":
            break
          args.append(arg)
        found.append((start, tokens[i + 1], args))
  return found


@functools.lru_cache(maxsize=None)
def launch_flags():
  """({name: (is_bool, enum values or None)} of every flag `python launch.py` accepts, the default
  --config, the names absl itself defines), from importing launch.py in a fresh interpreter (its
  flags are defined at import; main is not run)."""
  probe = ("import json\nfrom fewshot_jax import main as launch\n"
           "F = launch.FLAGS\n"
           "print(json.dumps({'default_config': launch._DEFAULT_CONFIG, 'flags': {n: [F[n].boolean, "
           "getattr(F[n].parser, 'enum_values', None)] for n in F}, 'absl': [f.name for m, fs in "
           "F.flags_by_module_dict().items() if m.startswith('absl') for f in fs]}))\n")
  out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True,
                       timeout=120).stdout
  info = json.loads(out.strip().splitlines()[-1])
  flags = {n: (b, e) for n, (b, e) in info["flags"].items()}
  flags.update({n: (False, None) for n in _ABSL_SPECIAL if n not in flags})
  return flags, info["default_config"], frozenset(info["absl"]) | _ABSL_SPECIAL


@functools.lru_cache(maxsize=None)
def _config(path: str, preset: str | None):
  if preset is None:  # --config=FILE: ml_collections calls get_config() with no argument
    return config_lib.load_module(path).get_config()
  return config_lib.load_file(path, preset)


def _flag_name(arg: str) -> tuple[str, str]:
  name, _, value = arg[2:].partition("=")
  return name, value


def check_launch(args: list[str]) -> list[str]:
  """What is wrong with `python launch.py ARGS` as a command line; [] when it parses."""
  flags, default_config, _ = launch_flags()
  problems, overrides, config_arg = [], [], default_config
  for arg in args:
    arg = arg.strip("[]")
    if arg in ("", "..."):
      continue
    if not arg.startswith("--"):
      problems.append(f"{arg!r}: launch.py takes only flags")
      continue
    name, value = _flag_name(arg)
    if name.startswith("config."):
      overrides.append(name[len("config."):])
    elif name == "config":
      config_arg = value
    elif name in flags:
      enum = flags[name][1]
      if enum and value and not _PLACEHOLDER.search(value):
        problems += [f"--{name}={v}: not one of {enum}" for v in value.split("|") if v not in enum]
    elif not (name.startswith("no") and flags.get(name[2:], (False,))[0]):
      problems.append(f"--{name}: launch.py defines no such flag")
  if _PLACEHOLDER.search(config_arg):  # a template such as configs/<method>.py:<preset>
    return problems
  path, _, preset = config_lib.resolve_config_arg(config_arg).partition(":")  # <method>:<preset> too
  file = REPO / path
  if not file.is_file():
    return problems + [f"--config={config_arg}: no file {path}"]
  try:
    config = _config(str(file), preset or None)
  except Exception as e:  # pylint: disable=broad-exception-caught
    return problems + [f"--config={config_arg}: {type(e).__name__}: {e}"]
  for key in overrides:
    node = config
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        problems.append(f"--config.{key}: {config_arg} has no such key")
        break
      node = node[part]
  return problems


def _defined_flags(script) -> tuple[set, set]:
  """(flag names, bool flag names) that a benchmark script and the benchmarks modules it imports
  define with absl (DEFINE_*("name", ...)) or argparse (add_argument("--name"))."""
  names, bools, seen, todo = set(), set(), set(), [script]
  while todo:
    path = todo.pop()
    if path in seen or not path.is_file():
      continue
    seen.add(path)
    text = path.read_text()
    for kind, name in re.findall(r"DEFINE_(\w+)\(\s*[\"'](\w+)[\"']", text):
      names.add(name)
      if kind == "bool":
        bools.add(name)
    names.update(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", text))
    for module in re.findall(r"^\s*(?:from benchmarks import (\w+)|import benchmarks\.(\w+)|"
                             r"from benchmarks\.(\w+) import)", text, re.M):
      todo += [REPO / "benchmarks" / f"{m}.py" for m in module if m]
  return names, bools


def check_benchmark(script: str, args: list[str]) -> list[str]:
  """What is wrong with `python SCRIPT ARGS` for a script under benchmarks/; [] when it parses."""
  path = REPO / script
  if not path.is_file():
    return [f"{script}: no such script"]
  names, bools = _defined_flags(path)
  absl = launch_flags()[2]  # every absl program has these
  problems = []
  for arg in args:
    if not arg.startswith("--"):
      continue  # benchmark scripts may take positional arguments
    name, _ = _flag_name(arg)
    if name not in names | absl and not (name.startswith("no") and name[2:] in bools):
      problems.append(f"{script} --{name}: not defined in the script")
  return problems


def _problems(document) -> tuple[list[str], int]:
  problems, checked = [], 0
  text = document.read_text()
  for first, lines in fenced_blocks(text) + code_spans(text):
    for line, script, args in commands(lines, first):
      if script.endswith("launch.py") or script == "fewshot-jax":
        found = check_launch(args)
      elif re.match(r"(\./)?benchmarks/\w+\.py$", script):
        found = check_benchmark(script.removeprefix("./"), args)
      else:  # another script of the repository: it exists
        found = [] if (REPO / script).is_file() else [f"{script}: no such script"]
      checked += 1
      name = document.relative_to(REPO) if document.is_relative_to(REPO) else document.name
      problems += [f"{name}:{line}: {p}" for p in found]
  return problems, checked


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_documents_parses(document):
  problems, _ = _problems(document)
  assert not problems, "\n".join(problems)


def test_the_documents_show_commands():
  """The checker finds what it checks: the README's main job and the measured benchmark commands."""
  readme = [c for first, lines in fenced_blocks((REPO / "README.md").read_text()) for c in commands(lines, first)]
  assert any(script == "launch.py" and args == [] for _, script, args in readme)  # the main job
  assert _problems(REPO / "benchmarks" / "RESULTS.md")[1] >= 10


def test_commands_are_read_as_a_shell_would():
  block = """C="--config.data.input_size=84"
for i in 0 1; do
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python launch.py --distributed \\
    --process_id=$i --config=configs/protonet.py:synthetic --workdir=/tmp/pod &
done; wait
python3 launch.py $C --mode=eval   # a comment --not_a_flag
gcloud compute tpus tpu-vm ssh NAME --command="cd fewshot_jax && \\
  python launch.py --distributed --workdir=/mnt/lgm"
FEWSHOT_DATA_DIR=../shared/data python benchmarks/throughput.py --steps=5 && python -m pytest -q
cd /tmp && fewshot-jax --config=protonet:synthetic --mode=eval
""".splitlines()
  assert commands(block, 10) == [
      (12, "launch.py", ["--distributed", "--process_id=$i", "--config=configs/protonet.py:synthetic",
                         "--workdir=/tmp/pod"]),
      (15, "launch.py", ["--config.data.input_size=84", "--mode=eval"]),
      (16, "launch.py", ["--distributed", "--workdir=/mnt/lgm"]),
      (18, "benchmarks/throughput.py", ["--steps=5"]),
      (19, "fewshot-jax", ["--config=protonet:synthetic", "--mode=eval"]),
  ]


@pytest.mark.parametrize("args, needle", [
    (["--no_such_flag=1"], "--no_such_flag: launch.py defines no such flag"),
    (["--mode=bogus"], "--mode=bogus: not one of"),
    (["extra_argument"], "takes only flags"),
    (["--config=configs/no_such_method.py:synthetic"], "no file configs/no_such_method.py"),
    (["--config=configs/protonet.py:no-such-preset"], "--config=configs/protonet.py:no-such-preset"),
    (["--config=protonet:no-such-preset"], "--config=protonet:no-such-preset"),
    (["--config=no_such_method:synthetic"], "no file no_such_method"),
    (["--config=configs/protonet.py:synthetic", "--config.train.no_such_key=1"], "--config.train.no_such_key"),
    (["--config=configs/protonet.py:synthetic", "--config.method.cosine_scale=1"], "--config.method.cosine_scale"),
])
def test_the_checker_rejects_what_launch_would(args, needle):
  problems = check_launch(args)
  assert any(needle in p for p in problems), problems


def test_a_document_with_a_made_up_flag_fails(tmp_path):
  document = tmp_path / "bad.md"
  document.write_text("Text.\n\n```\npython launch.py --config=configs/protonet.py:synthetic \\\n"
                      "    --made_up_flag=1\n```\n\nAnd `python benchmarks/steps.py --made_up=2` inline.\n")
  assert _problems(document) == (["bad.md:4: --made_up_flag: launch.py defines no such flag",
                                  "bad.md:8: benchmarks/steps.py --made_up: not defined in the script"], 2)


def test_the_checker_accepts_and_rejects_benchmark_flags():
  assert check_launch(["--config=configs/lgmnet.py:omniglot-5w1s", "--config.method.cosine_scale=1",
                       "--nodistributed", "--mode=train|eval", "--alsologtostderr"]) == []
  assert check_benchmark("benchmarks/steps.py", ["--cases=protonet:synthetic", "--norun", "--per_class=20"]) == []
  assert check_benchmark("benchmarks/throughput.py", ["--steps=5", "--made_up=1"]) == [
      "benchmarks/throughput.py --made_up: not defined in the script"]
  assert check_benchmark("benchmarks/no_such.py", []) == ["benchmarks/no_such.py: no such script"]
