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
