"""One writer per directory: an advisory `fcntl.flock` on a lock file inside it (object storage: lease.py).

The kernel drops a flock when its holder dies (even by SIGKILL), so a stale lock
never blocks. The lock file stays empty and is never rewritten: taking the lock
changes nothing a user compares (bytes, mtimes); the holder's PID comes from
/proc/locks.
"""

import fcntl
import os
import time
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
  """Holds an exclusive advisory lock on `directory` (created if missing) until `release`.

  `file_name` names the lock file; several locks may live in one directory (a sweep's per-point locks).
  """

  def __init__(self, directory: str, what: str, file_name: str = LOCK_FILE):
    self.directory, self.what, self.file_name = directory, what, file_name
    self.path = os.path.join(directory, file_name)
    self.created_file = False
    self._fd: Optional[int] = None

  def acquire(self, wait_seconds: float = 0.0) -> "DirLock":
    """Takes the lock, retrying for up to `wait_seconds` (a `holder` probe holds it for microseconds)."""
    os.makedirs(self.directory, exist_ok=True)
    self.created_file = not os.path.exists(self.path)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait_seconds
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() < deadline:
          time.sleep(0.05)
          continue
        pid = _holder_pid(fd)
        os.close(fd)
        holder = f"process {pid}" if pid is not None else "another process"
        subject = f"{self.what} {self.directory}" if self.file_name == LOCK_FILE else self.what
        where = LOCK_FILE if self.file_name == LOCK_FILE else self.path
        raise UserError(f"{subject} is in use by {holder} (lock {where}). Wait for it to finish or stop it; "
                        "one writer per directory.") from None
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


def holder(path: str) -> Optional[str]:
  """Who holds the lock file at `path`: None if nobody (or no such file), else "process N" / "another process".

  Probes with a non-blocking flock that is released at once and never creates the file. Holders on other hosts
  are seen (as "another process") where the file system shares locks between hosts (NFS; Lustre mounted
  with -o flock). A writer racing the probe can see it
  as a holder for a moment: writers that may meet a probe retry (`DirLock.acquire(wait_seconds=...)`).
  """
  try:  # read-write where possible: NFS emulates flock with byte-range locks, which need write access
    fd = os.open(path, os.O_RDWR)
  except OSError:
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    pid = _holder_pid(fd)
    return f"process {pid}" if pid is not None else "another process"
  except OSError:  # a file system without flock: nothing to learn here
    return None
  finally:
    os.close(fd)  # closing drops the probe's own lock
  return None


def writer_lock(path: str, what: str):
  """The one-writer guard for a store location: this flock locally, a lease object on s3:// or gs://."""
  from metasae_jax.storage import lease, location  # pylint: disable=g-import-not-at-top
  if location.is_remote(path):
    return lease.Lease(path, what)
  return DirLock(path, what)
