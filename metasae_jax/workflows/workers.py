"""Worker processes that die with the process that started them, and get its SIGINT/SIGTERM.

A sweep starts one worker process per point stage. Killed with SIGKILL, the sweep
cannot stop them itself, so each worker asks the kernel to kill it when its parent
goes (`PR_SET_PDEATHSIG` on Linux) or, elsewhere, watches its parent's PID. A
SIGINT/SIGTERM to the sweep is forwarded to its workers, which save a checkpoint at
the next step boundary and exit; a rerun resumes them.
"""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

PARENT_ENV = "METASAE_PARENT_PID"
"""Set by `Workers.run` in each worker's environment: the PID of the process that must outlive it."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(use_prctl: bool = True) -> Optional[str]:
  """In a worker: be killed (SIGKILL) when the parent named by $METASAE_PARENT_PID dies. Returns the mechanism.

  Call it first thing, before slow imports. PR_SET_PDEATHSIG fires when the parent *thread* that forked this
  process exits; `Workers.run` forks from a thread that waits for the worker, so that thread outlives it
  unless the whole parent dies. Without prctl (not Linux, or `use_prctl=False`) a daemon thread polls the
  parent PID once a second. A parent already gone when this runs ends the worker at once.
  """
  expected = os.environ.get(PARENT_ENV)
  if not expected:
    return None  # started by hand, not by a sweep
  mechanism = "poll"
  if use_prctl and sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        mechanism = "prctl"
    except (OSError, AttributeError):
      pass
  if os.getppid() != int(expected):  # the parent died before the death signal was armed
    os._exit(1)
  if mechanism == "poll":
    def watch():
      while os.getppid() == int(expected):
        time.sleep(1.0)
      os._exit(1)  # as abrupt as SIGKILL: the run resumes from its last checkpoint
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
  return mechanism


class Workers:
  """Runs worker processes (one per call of `run`, from any thread) and forwards SIGINT/SIGTERM to them.

  Use as a context manager on the main thread to install the forwarding handlers; after a forwarded signal,
  `stopped` holds its number and `run` starts nothing new.
  """

  def __init__(self):
    self._procs: set = set()
    self._lock = threading.Lock()
    self._old: dict = {}
    self.stopped: Optional[int] = None

  def run(self, cmd: list, log, env: dict) -> Optional[int]:
    """Runs `cmd` with stdout/stderr into the open file `log`; its exit code, or None if stopped before start."""
    with self._lock:
      if self.stopped is not None:
        return None
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(env, **{PARENT_ENV: str(os.getpid())}))
      self._procs.add(proc)
    try:
      return proc.wait()
    finally:
      with self._lock:
        self._procs.discard(proc)

  def pids(self) -> list:
    with self._lock:
      return sorted(p.pid for p in self._procs)

  def forward(self, signum: int, frame=None) -> None:
    """Stops starting workers and passes `signum` on to the running ones (they checkpoint and exit)."""
    del frame
    self.stopped = signum
    with self._lock:
      for proc in self._procs:
        try:
          proc.send_signal(signum)
        except ProcessLookupError:
          pass

  def __enter__(self) -> "Workers":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self.forward)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
