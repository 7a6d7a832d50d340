"""The JAX API differences across the supported range (jax 0.4.35 .. 0.10.2), in one place.

Everything else imports these names from here instead of probing JAX itself, so
a new difference is one more entry in this file. Each entry names the versions.
"""

import importlib.metadata
import re

import jax


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` (public from jax 0.6.0); `jax.experimental.shard_map.shard_map` before.

  The old one takes the same mesh / specs; its replication check (`check_rep`,
  renamed `check_vma` when it became public) stays on, as the new default.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as experimental  # pylint: disable=g-import-not-at-top
  return experimental(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def use_gloo_on_cpu() -> None:
  """Cross-process collectives for CPU devices: jax 0.4.35 leaves jax_cpu_collectives_implementation
  at 'none' (processes cannot all-reduce: N processes on one machine, our pod tests); later releases
  (0.6.2 checked) default to 'gloo'. A value the user chose (e.g. 'mpi') stays. Before the backend
  starts (jax.distributed.initialize)."""
  if jax.config.values.get("jax_cpu_collectives_implementation") == "none":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def profile_data():
  """jax.profiler.ProfileData (a trace's events in Python), public from jax 0.6 (0.6.2 checked; 0.4.35
  has none): benchmarks/torch_vs_jax.py's per-op profile needs it."""
  from fewshot_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if not hasattr(jax.profiler, "ProfileData"):
    raise ConfigError(f"the per-op profile needs jax.profiler.ProfileData (jax >= 0.6); this is jax {jax.__version__}")
  return jax.profiler.ProfileData


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


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
