"""XLA:CPU defaults: added to XLA_FLAGS unless set or opted out; what 'auto' picks from them."""

import jax

from fewshot_jax import xla_setup
from fewshot_jax.models import layers

DEFAULT = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_defaults_are_added_and_user_flags_win():
  env = {}
  assert xla_setup.set_cpu_defaults(env) == DEFAULT and xla_setup.eigen_convolutions(env)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_setup.set_cpu_defaults(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", DEFAULT]
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}  # the user's
  assert xla_setup.set_cpu_defaults(env) == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  assert not xla_setup.eigen_convolutions(env)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", xla_setup.OPT_OUT: "0"}
  assert xla_setup.set_cpu_defaults(env) == "--xla_force_host_platform_device_count=2"
  assert not xla_setup.eigen_convolutions(env)  # jaxlib's default list: YNNPACK convolutions
  flag = "--xla_cpu_experimental_ynn_fusion_type="
  assert xla_setup.eigen_convolutions({"XLA_FLAGS": flag + "dot,eltwise"})
  assert xla_setup.eigen_convolutions({"XLA_FLAGS": flag})  # an empty list
  assert not xla_setup.eigen_convolutions({"XLA_FLAGS": flag + "+dot"})  # default list, plus dot


def test_this_process_has_the_defaults_and_auto_follows_them():
  """conftest set the defaults before any backend existed: on the CPU, plain convolutions are
  XLA's, kernel-batched ones use the matmul weight gradient."""
  assert xla_setup.eigen_convolutions()
  if jax.default_backend() == "cpu":
    assert layers.resolve_conv_impl("auto") == "xla" and layers.conv_function("auto") is None
    assert layers.task_conv_function("auto") is layers.matmul_wgrad_conv
  assert layers.conv_function("matmul_wgrad") is layers.matmul_wgrad_conv
  assert layers.resolve_conv_impl("matmul_wgrad") == "matmul_wgrad"
