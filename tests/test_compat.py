"""The JAX differences across the declared range, and the line a JAX outside it gets."""

import importlib.metadata

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fewshot_jax import compat
from fewshot_jax import sharding


def test_a_jax_outside_the_declared_range_gets_one_line(monkeypatch):
  real = importlib.metadata.version
  assert compat.outside_tested_range() is None  # the installed one is inside (CI installs from setup.cfg)
  for name, have in (("jax", "0.11.0"), ("jaxlib", "0.4.30")):
    monkeypatch.setattr(importlib.metadata, "version", lambda n, name=name, have=have: have if n == name else real(n))
    line = compat.outside_tested_range()
    assert line == (f"{name} {have} is outside the tested range 0.4.35 to 0.10.2 (benchmarks/versions.py checks a "
                    f"release); if the run fails, install {name}==0.10.2"), line
  monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.4.35" if n in ("jax", "jaxlib") else real(n))
  assert compat.outside_tested_range() is None  # the bottom end itself is inside


def test_shard_map_runs_on_this_jax():
  mesh = sharding.make_mesh(jax.devices()[:1])
  f = compat.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh, in_specs=P("data"), out_specs=P())
  np.testing.assert_array_equal(f(np.arange(4.0)), np.arange(4.0))
