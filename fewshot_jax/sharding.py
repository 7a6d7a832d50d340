"""Device mesh helpers: one 1-D mesh over all devices; the task axis is sharded, parameters replicated."""

import jax
import numpy as np

from fewshot_jax.errors import ConfigError


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all devices of all hosts; axis 'data' carries the task axis."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices, ("data",))


def setup(config):
  """(config, mesh) every entry point starts from: the config validated, pixel statistics it leaves
  to the data filled in (input_pipeline.with_statistics), a mesh over all devices of all processes,
  and episode.tasks / eval.tasks rounded up to multiples of its size."""
  from fewshot_jax import config as config_lib  # pylint: disable=g-import-not-at-top  # (config imports no jax)
  from fewshot_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  mesh = make_mesh()
  config = input_pipeline.with_statistics(config)
  return config_lib.fit_to_devices(config, mesh.size), mesh


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def task_sharded(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def check_tasks_divisible(tasks: int, mesh, key: str) -> None:
  if tasks % mesh.size:
    raise ConfigError(f"{key}={tasks} must be a multiple of the {mesh.size} devices; "
                      f"use {key}={mesh.size * max(1, round(tasks / mesh.size))}")


def check_batch_divisible(example, mesh) -> None:
  """The training batch's leading (task or image) axis must split evenly over the devices."""
  sizes = {x.shape[0] for x in jax.tree.leaves(example) if x.shape}
  bad = sorted(n for n in sizes if n % mesh.size)
  if bad:
    raise ConfigError(f"the training batch has {bad[0]} tasks or images per step, not a multiple of the "
                      f"{mesh.size} devices; set episode.tasks or the method's batch size to a multiple "
                      f"of {mesh.size}")

