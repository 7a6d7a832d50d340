"""The repo's promises about itself: CI runs the README's test command; every preset is valid."""

import re

import pytest

from fewshot_jax import config as config_lib
from tests.conftest import REPO, load_config

PRESETS = ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "mini-5w1s",
           "mini-5w5s", "synthetic"]


def test_ci_runs_the_readme_test_command():
  readme = (REPO / "README.md").read_text()
  command = re.search(r"pip install -e '\.\[test\]' && FEWSHOT_DATA_DIR=\S+ (python -m pytest[^\n]*)",
                      readme).group(1)
  ci = (REPO / ".ci" / "run").read_text()
  assert command in ci.splitlines()


@pytest.mark.parametrize("method", ["protonet", "matchingnet", "lgmnet"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_valid(method, preset):
  c = config_lib.validate(load_config(method, preset))
  assert c.method.name == method
  ways, shots = (1, 1) if preset == "synthetic" else map(int, preset.split("-")[1].rstrip("s").split("w"))
  if preset != "synthetic":
    assert (c.episode.ways, c.episode.shots) == (ways, shots)
  assert c.eval.episodes == 600 and c.eval.queries == 15 and c.eval.split == "test"


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
