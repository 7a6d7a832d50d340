"""SIGTERM (preemption, the end of a pod slot) and Ctrl-C: checkpoint at a step boundary, then stop.

A signal only sets a flag; the trainer asks `agreed()` after every host call,
so all processes stop after the same step, even when the signal reached only
some of them, and all take part in the last checkpoint. A second Ctrl-C stops
at once. The trainer then raises `Stopped`, which launch.py turns into exit
code 128 + signal (143 for SIGTERM, 130 for SIGINT), as a shell reports a
process killed by that signal, so schedulers treat the job as preempted.
"""

import signal
import threading
import time

from absl import logging

from fewshot_jax import multihost

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
REPEAT_WINDOW = 1.0  # seconds: a signal this soon after the first is the same one, delivered twice


class Stopped(Exception):
  """The run stopped on a signal after checkpointing `step`."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step = signum, step
    self.exit_code = 128 + signum
    super().__init__(f"stopped by {_NAMES.get(signum, signum)} after step {step}; the checkpoint is in "
                     f"{directory}; run the same command again to resume")


class StopRequests:
  """Context manager: SIGTERM / SIGINT handlers that record a stop request (main thread only)."""

  def __init__(self):
    self._signum = 0
    self._when = 0.0
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in _NAMES}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self._signum and time.monotonic() - self._when < REPEAT_WINDOW:
      return  # one signal delivered twice (to the process and to its group)
    if signum == signal.SIGINT and self._signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self._when = time.monotonic()
    self._signum = signum
    logging.warning("%s received: checkpointing at the next step boundary, then stopping%s", _NAMES[signum],
                    " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")

  def agreed(self) -> int:
    """The signal to stop on (0: none): the same answer on every process."""
    return multihost.max_over_processes(self._signum)
