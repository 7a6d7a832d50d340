"""Several processes (a pod, a multi-GPU host, N processes on one machine): start-up and agreement.

One process per host (TPU) or per GPU joins a JAX cluster; every process runs
the same program on its own devices of one global mesh. What must happen once
(files, figures, TensorBoard, INFO log lines) happens on process 0; what all
must agree on (stopping, replica parameters) is decided by a small collective.
"""

import zlib

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

from fewshot_jax.errors import ConfigError, FewshotError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
  """jax.distributed.initialize with the cluster detected (Slurm, Open MPI, Cloud TPU, k8s) or given.

  Explicit values win over detected ones; give coordinator, process count and
  process id together outside a cluster JAX detects.
  """
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
    missing = [f"--{k}" for k, v in given.items() if v is None]
    raise ConfigError(f"--coordinator_address, --num_processes and --process_id go together; missing "
                      f"{', '.join(missing)} (or give none, inside a cluster JAX detects)")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes} must be a positive integer")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
  if coordinator_address is not None:
    check_address(coordinator_address)
  if local_device_ids and any(i < 0 for i in local_device_ids):
    raise ConfigError(f"--local_device_ids={','.join(map(str, local_device_ids))} must be device numbers >= 0")
  host = (coordinator_address or "").rsplit(":", 1)[0].strip("[]")
  # A loopback coordinator (N processes on one machine) listens on loopback only, not on every interface.
  bind = coordinator_address if host in ("localhost", "::1") or host.startswith("127.") else None
  try:
    jax.distributed.initialize(**given, local_device_ids=local_device_ids or None,
                               coordinator_bind_address=bind)
  except (ValueError, RuntimeError) as e:
    text = " ".join(str(e).split())
    raise ConfigError(f"--distributed could not join the cluster: {text[:300]}; outside Slurm, Open MPI, "
                      "Kubernetes or Cloud TPU pass --coordinator_address=HOST:PORT --num_processes=N "
                      "--process_id=I") from None


def check_address(address: str) -> None:
  """HOST:PORT (or [IPv6]:PORT) with a port in 1..65535, else one ConfigError: JAX hands a malformed
  address to its C++ client, which crashes the interpreter (a segfault for '127.0.0.1:notaport')."""
  host, sep, port = address.rpartition(":")
  bracketed = host.startswith("[") and host.endswith("]")
  ok = (sep and host and port.isdigit() and 1 <= int(port) <= 65535 and
        (bracketed or (":" not in host and not any(c.isspace() or c in "/[]" for c in host))))
  if not ok:
    raise ConfigError(f"--coordinator_address={address!r} is not HOST:PORT with a port in 1..65535 "
                      "(e.g. 127.0.0.1:12345, node0:12345 or [::1]:12345)")


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (one tiny all-gather with several processes)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def run_on_main(fn, what: str) -> None:
  """Runs fn() on process 0; if it raises a FewshotError, every process raises (process 0 its own)."""
  error = None
  if is_main():
    try:
      fn()
    except FewshotError as e:
      error = e
  if any_process(error is not None):
    raise error if error is not None else ConfigError(f"process 0 failed {what}; its error says why")


def max_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def fingerprint(tree) -> int:
  """CRC-32 of every leaf's bytes: equal only for bit-identical trees."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return crc


def check_replicas_agree(tree, what: str) -> int:
  """Raises on every process if the processes' copies of a replicated `tree` are not bit-identical."""
  crc = fingerprint(tree)
  if jax.process_count() > 1:  # 16-bit halves: the all-gather carries int32
    multihost_utils.assert_equal(np.array([crc >> 16, crc & 0xFFFF], np.int32), f"{what} differ between processes")
  return crc


class _ProcessPrefix:
  """Prefixes log lines of processes other than 0 with their index."""

  def __init__(self, index: int):
    self._index = index

  def filter(self, record) -> bool:
    record.msg = f"[process {self._index}] {record.msg}"
    return True


def setup_logging() -> None:
  """Process 0 logs INFO; the others only warnings and errors, prefixed '[process i]'."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_ProcessPrefix(jax.process_index()))
