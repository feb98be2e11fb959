"""One writer per directory: an advisory `fcntl.flock` on a lock file inside it (object storage: lease.py).

The kernel drops a flock when its holder dies (even by SIGKILL), so a stale lock
never blocks. The lock file stays empty and is never rewritten: taking the lock
changes nothing a user compares (bytes, mtimes); the holder's PID comes from
/proc/locks.
"""

import fcntl
import os
from typing import Optional

from metasae_jax.core.errors import UserError

LOCK_FILE = ".metasae.lock"


def _holder_pid(fd: int) -> Optional[int]:
  """PID holding a flock on the file open at fd, from /proc/locks (Linux); None where unavailable."""
  st = os.fstat(fd)
  want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
  try:
    with open("/proc/locks") as f:
      for line in f:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" (blocked waiters carry "->" and shift by one)
        if "FLOCK" in parts and "->" not in parts and len(parts) >= 6 and parts[5] == want:
          return int(parts[4])
  except (OSError, ValueError):
    return None
  return None


class DirLock:
  """Holds an exclusive advisory lock on `directory` (created if missing) until `release`."""

  def __init__(self, directory: str, what: str):
    self.directory, self.what = directory, what
    self.path = os.path.join(directory, LOCK_FILE)
    self.created_file = False
    self._fd: Optional[int] = None

  def acquire(self) -> "DirLock":
    os.makedirs(self.directory, exist_ok=True)
    self.created_file = not os.path.exists(self.path)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      pid = _holder_pid(fd)
      os.close(fd)
      holder = f"process {pid}" if pid is not None else "another process"
      raise UserError(f"{self.what} {self.directory} is in use by {holder} (lock {LOCK_FILE}). Wait for it "
                      "to finish or stop it; one writer per directory.") from None
    self._fd = fd
    return self

  def release(self, remove_file: bool = False) -> None:
    """Unlocks; `remove_file` deletes a lock file this lock created (a failed first attempt cleans up)."""
    if self._fd is None:
      return
    if remove_file and self.created_file:
      try:
        os.remove(self.path)
      except OSError:
        pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def check(self) -> None:
    """A flock cannot be lost while held (the lease on object storage can)."""

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def writer_lock(path: str, what: str):
  """The one-writer guard for a store location: this flock locally, a lease object on s3:// or gs://."""
  from metasae_jax.storage import lease, location  # pylint: disable=g-import-not-at-top
  if location.is_remote(path):
    return lease.Lease(path, what)
  return DirLock(path, what)
