"""XLA:CPU settings that must be in XLA_FLAGS before JAX creates its CPU backend.

XLA reads XLA_FLAGS once, when the first computation creates a backend, so
launch.py, the benchmarks and the tests call `set_cpu_defaults()` first thing.

jaxlib 0.10 hands every convolution on the CPU to YNNPACK (library fusion type
`individual_convolution`, on by default). For the layers of our models that is
about 2x slower than XLA's own (Eigen) convolution: measured on the 2-core CPU
with benchmarks/conv_layers.py, forward + backward of a 3x3 64->64 convolution
on 80 21x21 maps takes 101 ms with it and 51 ms without (PyTorch/oneDNN: 44 ms).
`-individual_convolution` takes it off the default list and keeps the rest.
A flag the user already put in XLA_FLAGS wins; FEWSHOT_XLA_CPU_DEFAULTS=0
leaves XLA_FLAGS alone (jaxlib's own defaults).

XLA aborts the process (SIGABRT, before any Python can catch it) on a flag or a
value it does not know, so each default is added only from the first jaxlib
that knows it, read from the installed package's metadata (importing jax would
be too late). The YNNPACK flag exists from jaxlib 0.8.1, but its
`individual_convolution` type (and YNNPACK convolutions) only from 0.9.0
(jaxlib 0.8.1-0.8.3 abort on the value): found in the strings of each
release's libjax_common.so and by running launch.py on 0.8.1 (abort) and
0.9.0 (runs).
"""

import importlib.metadata
import os
import re

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# (flag, the first jaxlib that knows it)
CPU_DEFAULTS = ((f"{YNN_FUSION_FLAG}=-individual_convolution", (0, 9, 0)),)
OPT_OUT = "FEWSHOT_XLA_CPU_DEFAULTS"


def version_tuple(text: str) -> tuple[int, ...]:
  """'0.10.2' (or '0.9.0.1', '0.8.1+cuda') -> (0, 10, 2): the first three numbers of a release."""
  return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def jaxlib_version() -> tuple[int, ...] | None:
  """The installed jaxlib's version, e.g. (0, 10, 2); None without one."""
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return version_tuple(text)


def set_cpu_defaults(environ=None, jaxlib=None) -> list[str]:
  """Adds CPU_DEFAULTS to XLA_FLAGS (each unless the user set that flag or this jaxlib does not know
  it); returns one note per default left out for the jaxlib, saying why (the launcher logs them)."""
  environ = os.environ if environ is None else environ
  jaxlib = jaxlib_version() if jaxlib is None else jaxlib
  flags, notes = environ.get("XLA_FLAGS", "").split(), []
  if environ.get(OPT_OUT, "1") != "0":
    names = {f.split("=", 1)[0] for f in flags}
    for flag, since in CPU_DEFAULTS:
      if flag.split("=", 1)[0] in names:
        continue
      if jaxlib is not None and jaxlib < since:
        notes.append(f"XLA_FLAGS: {flag} left out: jaxlib {'.'.join(map(str, jaxlib))} does not know it "
                     f"(from {'.'.join(map(str, since))}) and would abort")
      else:
        flags.append(flag)
  environ["XLA_FLAGS"] = " ".join(flags)
  return notes


def eigen_convolutions(environ=None, jaxlib=None) -> bool:
  """Whether convolutions run on XLA:CPU's own kernels: always before jaxlib 0.9.0 (no YNNPACK
  convolutions); from 0.9.0 where XLA_FLAGS sets the YNNPACK fusion types without
  `individual_convolution` (jaxlib's default list, used when the flag is absent, has it)."""
  environ = os.environ if environ is None else environ
  jaxlib = jaxlib_version() if jaxlib is None else jaxlib
  if jaxlib is not None and jaxlib < CPU_DEFAULTS[0][1]:
    return True
  for flag in environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == YNN_FUSION_FLAG:
      types = [t.strip() for t in value.split(",") if t.strip()]
      if any(t.startswith(("+", "-")) for t in types):  # edits of the default list
        return "-individual_convolution" in types and "+individual_convolution" not in types
      return "individual_convolution" not in types  # an explicit list
  return False
