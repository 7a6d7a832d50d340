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
"""

import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_DEFAULTS = (f"{YNN_FUSION_FLAG}=-individual_convolution",)
OPT_OUT = "FEWSHOT_XLA_CPU_DEFAULTS"


def set_cpu_defaults(environ=None) -> str:
  """Adds CPU_DEFAULTS to XLA_FLAGS (each unless the user set that flag); returns XLA_FLAGS."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "").split()
  if environ.get(OPT_OUT, "1") != "0":
    names = {f.split("=", 1)[0] for f in flags}
    flags += [f for f in CPU_DEFAULTS if f.split("=", 1)[0] not in names]
  environ["XLA_FLAGS"] = " ".join(flags)
  return environ["XLA_FLAGS"]


def eigen_convolutions(environ=None) -> bool:
  """Whether XLA_FLAGS keeps convolutions on XLA:CPU's own kernels: it sets the YNNPACK fusion
  types without `individual_convolution` (jaxlib's default list, used when the flag is
  absent, has it)."""
  environ = os.environ if environ is None else environ
  for flag in environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == YNN_FUSION_FLAG:
      types = [t.strip() for t in value.split(",") if t.strip()]
      if any(t.startswith(("+", "-")) for t in types):  # edits of the default list
        return "-individual_convolution" in types and "+individual_convolution" not in types
      return "individual_convolution" not in types  # an explicit list
  return False
