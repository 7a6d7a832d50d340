"""XLA:CPU defaults: added to XLA_FLAGS unless set or opted out; what 'auto' picks from them."""

import jax
import pytest

from fewshot_jax import xla_setup
from fewshot_jax.models import layers

DEFAULT = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_defaults_are_added_and_user_flags_win():
  new = (0, 10, 2)
  env = {}
  assert xla_setup.set_cpu_defaults(env, new) == [] and env["XLA_FLAGS"] == DEFAULT
  assert xla_setup.eigen_convolutions(env, new)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_setup.set_cpu_defaults(env, new)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", DEFAULT]
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}  # the user's
  xla_setup.set_cpu_defaults(env, new)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  assert not xla_setup.eigen_convolutions(env, new)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", xla_setup.OPT_OUT: "0"}
  assert xla_setup.set_cpu_defaults(env, new) == [] and env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  assert not xla_setup.eigen_convolutions(env, new)  # jaxlib's default list: YNNPACK convolutions
  flag = "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_setup.eigen_convolutions({"XLA_FLAGS": flag + "dot,eltwise"}, new)
  assert xla_setup.eigen_convolutions({"XLA_FLAGS": flag}, new)  # an empty list
  assert not xla_setup.eigen_convolutions({"XLA_FLAGS": flag + "+dot"}, new)  # default list, plus dot


@pytest.mark.parametrize("jaxlib", [(0, 7, 1), (0, 8, 1), (0, 8, 3)])
def test_a_jaxlib_that_would_abort_on_a_default_does_not_get_it(jaxlib):
  """jaxlib 0.6.2-0.8.0 abort at start on the YNNPACK flag (unknown flag), 0.8.1-0.8.3 on its value:
  left out with one note naming the flag and the version; convolutions are XLA's own there."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  notes = xla_setup.set_cpu_defaults(env, jaxlib)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
  assert len(notes) == 1 and DEFAULT in notes[0] and ".".join(map(str, jaxlib)) in notes[0] and "0.9.0" in notes[0]
  assert xla_setup.eigen_convolutions(env, jaxlib)
  env = {}
  assert xla_setup.set_cpu_defaults(env, (0, 9, 0)) == [] and env["XLA_FLAGS"] == DEFAULT


def test_the_installed_jaxlib_is_read_without_importing_it():
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  assert xla_setup.jaxlib_version() == tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:3])
  assert ".".join(map(str, xla_setup.jaxlib_version())) in jax.lib.__version__


def test_this_process_has_the_defaults_and_auto_follows_them():
  """conftest set the defaults before any backend existed: on the CPU, plain convolutions are
  XLA's, kernel-batched ones use the matmul weight gradient."""
  assert xla_setup.eigen_convolutions()
  if jax.default_backend() == "cpu":
    assert layers.resolve_conv_impl("auto") == "xla" and layers.conv_function("auto") is None
    assert layers.task_conv_function("auto") is layers.matmul_wgrad_conv
  assert layers.conv_function("matmul_wgrad") is layers.matmul_wgrad_conv
  assert layers.resolve_conv_impl("matmul_wgrad") == "matmul_wgrad"
