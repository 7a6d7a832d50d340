"""Every phase of a run completes or fails in bounded time, with one line: signals, stuck and lost peers.

A process blocked inside a collective (a peer that is stuck, stopped or gone)
sits in C++ where no Python signal handler, exception or timeout of ours can
reach its main thread. So one daemon thread per process watches over it and,
when the run cannot go on, prints ONE line naming the phase, the last
checkpoint and what to do, and ends the process with os._exit (nothing is lost:
results and checkpoints are written atomically, and the run resumes from the
last checkpoint). The thread acts on:

- signals: SIGTERM / SIGINT write a byte to a socket the thread reads
  (signal.set_wakeup_fd), so it sees them even while the main thread is
  blocked. Where the run has something to save (training) the first signal is
  the main thread's to handle at the next step boundary (preemption.py) and a
  second one ends the process now; elsewhere (evaluation, compare) the first
  one does, exit 128 + signal.
- a stuck phase: a training call, validation, evaluation or checkpoint that
  has not completed after `stuck_timeout` seconds (with several processes:
  a peer hung in a collective never completes it) -> exit 124.
- a lost peer: every process writes a heartbeat to JAX's coordination service
  every few seconds and reads the others'; a peer silent for `peer_timeout`
  seconds (killed, stopped, its host gone) or an unreachable coordinator -> exit
  75. JAX's own heartbeat (jax.distributed.initialize's heartbeat_timeout_seconds,
  100 s) aborts the survivors later with a C++ stack trace; ours comes first.
- a failed collective (a peer killed: gloo's connection closes at once) raises
  in the main thread; launch.py hands it to `end_now` (exit 75).

A process that ends the run leaves its line in the coordination service and
waits one heartbeat before exiting: JAX aborts every other process the moment
the coordinator (process 0) is gone, so each peer's watchdog says why first.

XLA's own collective timeouts (xla_cpu_collective_call_terminate_timeout_seconds,
40 s, for devices of one process; gloo's TCP timeouts across processes) end a
stuck collective with an abort and a C++ message that names no phase; they stay
as a backstop.
"""

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time

import jax

from fewshot_jax import jax_internals
from fewshot_jax import preemption

EXIT_STUCK = 124  # as `timeout` reports a command it ended
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: run the same command again
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
_HEARTBEAT_DIR = "fewshot_jax/alive/"
_END_KEY = "fewshot_jax/end"  # why a process ended the run: its peers' watchdogs say so and end too


@dataclasses.dataclass
class Settings:
  stuck_timeout: float = 600.0  # seconds; 0: never (launch.py --stuck_timeout)
  peer_timeout: float = 40.0  # seconds without a peer's heartbeat (launch.py --peer_timeout)
  heartbeat_every: float = 2.0
  grace: float = 2.0  # after a second signal, time for the main thread to act on it first
  repeat_window: float = preemption.REPEAT_WINDOW


class Watchdog:
  """The watching thread of one process. `phase(name)` marks what the main thread is doing;
  `checkpoint` holds the text naming the last checkpoint; `saving` says whether a first signal is
  the main thread's to act on (a run with something to save) or ends the process."""

  def __init__(self, settings: Settings | None = None, out=None):
    self.settings = settings or Settings()
    self.checkpoint = ""  # e.g. 'the last checkpoint is step 40 in DIR' (the trainer sets it)
    self.saving = False
    self._phase, self._since = None, time.monotonic()  # None: between phases (not bounded)
    self._last = "start-up"  # the current or last phase, for messages
    self._out = out or sys.stderr
    self._lock = threading.Lock()
    self._signals: list[float] = []  # when each signal came
    self._read, self._write = socket.socketpair()
    self._previous_fd = None
    self._stop = threading.Event()
    self._thread = None
    self._client = None  # the coordination service's key-value store (several processes)

  # The main thread's side.
  def start(self) -> "Watchdog":
    """Starts the thread; installs the signal wake-up (main thread only)."""
    if threading.current_thread() is threading.main_thread():
      self._write.setblocking(False)
      self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
      for s in _NAMES:  # wake-up bytes are written for signals with a Python handler: this thread acts
        signal.signal(s, lambda signum, frame: None)
    self._client = jax_internals.coordination_client() if jax.process_count() > 1 else None
    self._thread = threading.Thread(target=self._run, name="fewshot-watchdog", daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    self._stop.set()
    if self._previous_fd is not None:
      signal.set_wakeup_fd(self._previous_fd)
      self._previous_fd = None
    with contextlib.suppress(OSError):
      self._write.send(b"\0")  # wakes the thread, which then stops

  @contextlib.contextmanager
  def phase(self, name: str):
    """Marks the main thread as in phase `name` (bounded by stuck_timeout) until the block ends."""
    with self._lock:
      previous = self._phase
      self._phase, self._last, self._since = name, name, time.monotonic()
    try:
      yield
    finally:
      with self._lock:
        self._phase, self._since = previous, time.monotonic()

  def end_now(self, code: int, what: str) -> None:
    """Ends the process at once with one line: `what` went wrong during the current or last phase
    (e.g. a collective raised: a peer is gone). Skips JAX's shutdown barrier, which would wait for
    the lost peer until JAX's heartbeat aborts the process with a C++ stack trace."""
    with self._lock:
      phase, last = self._phase, self._last
    self._end(code, self._line(f"{what} {_during(phase or last, last)}", every=True))

  # The thread's side.
  def _end(self, code: int, message: str, tell_peers: bool = True) -> None:
    print(message, file=self._out, flush=True)
    if tell_peers and jax.process_count() > 1:  # before the coordinator (process 0) goes: JAX aborts the
      _tell_peers(self._client, code, message, self.settings.heartbeat_every)  # others when it does, naming nothing
    os._exit(code)  # pylint: disable=protected-access

  def _run(self) -> None:
    s = self.settings
    self._read.settimeout(1.0)
    beat = _Heartbeat(s, self._client) if self._client is not None else None
    while not self._stop.is_set():
      try:
        data = self._read.recv(64)
      except socket.timeout:
        data = b""
      except OSError:
        return
      if self._stop.is_set():
        return
      for byte in data:
        if byte in _NAMES:
          self._on_signal(byte)
      with self._lock:
        phase, since, last = self._phase, self._since, self._last
      if (s.stuck_timeout and jax.process_count() > 1 and phase is not None
          and time.monotonic() - since > s.stuck_timeout):
        self._end(EXIT_STUCK, self._line(
            f"error: {phase} did not complete within {s.stuck_timeout:.0f} s on process {jax.process_index()}: a "
            "peer is stuck in a collective (or the phase needs longer: raise --stuck_timeout)", every=True))
      if beat is not None:
        lost = beat.check()
        if isinstance(lost, tuple):  # a peer ended the run and said why
          code, peer, why = lost
          self._end(code, f"error: process {peer} ended the run: {why.removeprefix('error: ')}", tell_peers=False)
        if lost:
          self._end(EXIT_PEER_LOST, self._line(f"error: {lost} {_during(phase, last)}", every=True))

  def _on_signal(self, signum: int) -> None:
    now = time.monotonic()
    if self._signals and now - self._signals[-1] < self.settings.repeat_window:
      return  # one signal delivered twice (`timeout` signals the child and its process group)
    self._signals.append(now)
    if self.saving and len(self._signals) == 1:
      return  # the trainer checkpoints at the next step boundary (preemption.StopRequests)
    if self.saving:  # a second signal: the main thread may still act on it (exit 130 itself)
      time.sleep(self.settings.grace)
    elif jax.process_count() > 1 and jax.process_index() == 0:  # the coordinator goes last: JAX aborts the
      time.sleep(self.settings.grace)  # others (rc -6, no line of ours) the moment it is gone
    with self._lock:
      phase, last = self._phase, self._last
    what = f"stopped {'at once ' if self.saving else ''}by {_NAMES[signum]} {_during(phase, last)}"
    self._end(128 + signum, self._line(what) if self.saving else
              f"{what}; nothing was being saved; run the same command again")

  def _line(self, what: str, every: bool = False) -> str:
    again = "run the same command again" + (" (every process)" if every else "")
    resume = self.checkpoint.startswith("the last checkpoint")
    return "; ".join(x for x in (what, self.checkpoint, again + (" to resume" if resume else "")) if x)


class _Heartbeat:
  """Liveness through the coordination service's key-value store: one key per process, its value
  the writer's count of beats; a peer whose count has not moved for peer_timeout seconds is lost."""

  def __init__(self, settings: Settings, client):
    self._client = client
    self._settings = settings
    self._me = jax.process_index()
    self._beats = 0
    self._last_beat = 0.0
    self._seen: dict[int, tuple[str, float]] = {}
    self._started = time.monotonic()

  def check(self):
    """None while every peer is alive; (exit code, process, its line) where a peer ended the run; else
    what is lost, in words."""
    now = time.monotonic()
    if now - self._last_beat < self._settings.heartbeat_every:
      return None
    self._last_beat = now
    self._beats += 1
    try:
      self._client.key_value_set(f"{_HEARTBEAT_DIR}{self._me}", str(self._beats), allow_overwrite=True)
      values = dict(self._client.key_value_dir_get(_HEARTBEAT_DIR))
      ended = self._client.key_value_try_get(_END_KEY)
    except Exception as e:  # pylint: disable=broad-exception-caught  # the coordinator is gone
      if "NOT_FOUND" not in str(e):
        return f"the coordinator (process 0) cannot be reached ({' '.join(str(e).split())[:120]})"
      ended = None
    if ended:
      code, peer, why = ended.split(" ", 2)
      if int(peer) != self._me:  # (its own: this process is ending already)
        return int(code), int(peer), why
    timeout = self._settings.peer_timeout
    for p in range(jax.process_count()):
      if p == self._me:
        continue
      value = values.get(f"{_HEARTBEAT_DIR}{p}")
      seen_value, since = self._seen.get(p, (None, self._started))
      if value != seen_value:
        self._seen[p] = (value, now)
      elif now - since > timeout:
        return f"process {p} is gone (no heartbeat for {timeout:.0f} s: killed, stopped or its host lost)"
    return None


def _tell_peers(client, code: int, message: str, wait: float) -> None:
  """Leaves `message` for the peers' watchdogs, then gives them time to read it (one heartbeat)."""
  if client is None:  # no key-value store (jax_internals): JAX's own abort tells the peers
    return
  try:
    client.key_value_set(_END_KEY, f"{code} {jax.process_index()} {message}")
    if jax.process_index() == 0:  # only the coordinator's exit takes the others down with it
      time.sleep(wait + 1.0)
  except Exception:  # pylint: disable=broad-exception-caught  # another process said it first, or no coordinator
    pass


def _during(phase: str | None, last: str) -> str:
  return f"during {phase}" if phase else f"after {last}"


@contextlib.contextmanager
def watching(settings: Settings | None = None):
  """A started Watchdog for the block (launch.py wraps every mode in one)."""
  dog = Watchdog(settings).start()
  try:
    yield dog
  finally:
    dog.close()


class NoWatchdog:
  """What library calls get by default (tests, notebooks): phases that only mark nothing."""

  checkpoint = ""
  saving = False

  def end_now(self, code: int, what: str) -> None:
    del code, what

  @contextlib.contextmanager
  def phase(self, name: str):
    del name
    yield
