"""The declared JAX range (setup.cfg) is what the launcher checks: a JAX outside it starts with one line."""

import configparser
import importlib.metadata
import re

from fewshot_jax import compat
from tests.conftest import REPO


def _declared(name: str) -> tuple[str, str]:
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  line = next(l for l in cfg["options"]["install_requires"].split("\n") if re.match(rf"{name}\s*[<>=]", l))
  return re.search(r">=([\d.]+)", line).group(1), re.search(r"<=([\d.]+)", line).group(1)


def test_a_jax_outside_the_declared_range_gets_one_line(monkeypatch):
  real = importlib.metadata.version
  assert compat.outside_tested_range() is None  # the installed one is inside (CI installs from setup.cfg)
  for name in ("jax", "jaxlib"):
    low, high = _declared(name)
    for have in ("0.6.2", "0.11.0"):
      monkeypatch.setattr(importlib.metadata, "version", lambda n, name=name, have=have: have if n == name else real(n))
      line = compat.outside_tested_range()
      assert line == (f"{name} {have} is outside the tested range {low} to {high} (benchmarks/versions.py checks "
                      f"a release); if the run fails, install {name}=={high}"), line
    for have in (low, high):  # both ends are inside
      monkeypatch.setattr(importlib.metadata, "version", lambda n, name=name, have=have: have if n == name else real(n))
      assert compat.outside_tested_range() is None
