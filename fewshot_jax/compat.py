"""Where the supported JAX range (jax/jaxlib 0.7.1 .. 0.10.2, setup.cfg) ends, and why there.

Inside the range the public APIs we call are the same (benchmarks/versions.py
runs the main job, 2 devices and 2 processes at both ends and between), so
this module holds no shims; the differences that exist live where they act:
an XLA:CPU flag by jaxlib version (xla_setup.py) and JAX's private
coordination client (jax_internals.py). Found below the range, so a shim here
would not help:
- jax 0.6.x: orbax-checkpoint 0.12 (the one for jax 0.10) calls
  `jax.sharding.set_mesh` as a context manager when several processes save a
  replicated array; it is one from jax 0.7.1 (0.6.2: TypeError at the first
  checkpoint of a 2-process run), and orbax 0.11.x (which does not) fails on
  jax >= 0.7 (jax.experimental.layout.DeviceLocalLayout is gone).
- jax 0.4.35 and its orbax 0.11.5: orbax calls the coordination client's
  key_value_try_get, which that jaxlib lacks (2-process checkpoint fails);
  `jax.shard_map` is only public from 0.6; CPU processes need
  jax_cpu_collectives_implementation=gloo set by hand.
Single-process runs did work on 0.4.35 and 0.6.2 (main job measured, with the
YNNPACK flag left out), but a pod trainer's range is the pod's.
"""

import importlib.metadata
import re

from fewshot_jax.xla_setup import version_tuple as _version


def outside_tested_range() -> str | None:
  """One line where the running jax or jaxlib lies outside the range this package declares (its
  metadata: setup.cfg, the one home of the range), e.g. installed with --no-deps; else None. The run
  goes on: a newer JAX usually works, and the line says what is known to."""
  try:
    requires = importlib.metadata.requires("fewshot_jax") or []
  except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
    return None
  for req in requires:
    m = re.fullmatch(r"(jax|jaxlib)([<>=,.\d]+)", req.replace(" ", ""))
    if not m:
      continue
    try:
      have = importlib.metadata.version(m.group(1))
    except importlib.metadata.PackageNotFoundError:
      continue
    bounds = dict((op, _version(v)) for op, v in re.findall(r"(<=|>=)([\d.]+)", m.group(2)))
    if _version(have) < bounds.get(">=", ()) or ("<=" in bounds and _version(have) > bounds["<="]):
      low, high = (".".join(map(str, bounds.get(k, ()))) for k in (">=", "<="))
      return (f"{m.group(1)} {have} is outside the tested range {low} to {high} (benchmarks/versions.py checks "
              f"a release); if the run fails, install {m.group(1)}=={high}")
  return None
