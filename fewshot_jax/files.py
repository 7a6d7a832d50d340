"""Files that several processes, a crash or a kill can never leave half-written or shared."""

import contextlib
import fcntl
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a uniquely named temporary path beside `path`; renames it to `path` on success.

  A crash never leaves half a file, and concurrent writers never share a
  temporary name; on an error the temporary file is removed.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
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
