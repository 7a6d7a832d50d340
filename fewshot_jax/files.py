"""Files that several processes, a crash or a kill can never leave half-written or shared."""

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a uniquely named temporary path beside `path`; renames it to `path` on success.

  A crash never leaves half a file, and concurrent writers never share a
  temporary name; on an error the temporary file is removed.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_atomic(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


@contextlib.contextmanager
def file_lock(path: str):
  """An exclusive lock on `path` (created if missing) across processes of this host or a shared disk."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class WorkdirLock:
  """An exclusive claim on a training workdir: `<workdir>/lock` holds the holder's host, PID and start.

  Taken atomically (O_CREAT | O_EXCL). A lock left by a process that no longer
  runs on this host (killed) is taken over with a warning; a live holder, or
  one on another host, stops the second run with a message naming it.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._held = False

  def acquire(self) -> str | None:
    """Takes the lock; returns a warning if a stale one was taken over. Raises ConfigError if held."""
    from fewshot_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    warning = None
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
          warning = (f"took over the lock of workdir {os.path.dirname(self.path)} from PID {holder['pid']} "
                     f"(started {holder.get('started', '?')}), which no longer runs")
          with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
          continue
        raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by PID {holder.get('pid', '?')} on "
                          f"host {holder.get('host', '?')} since {holder.get('started', '?')}; use another "
                          f"--workdir, or wait for that run (if it is gone, delete {self.path})") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._held = True
      return warning
    raise ConfigError(f"could not take the lock {self.path}: another run took it first")

  def release(self) -> None:
    if self._held:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      self._held = False

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
