"""What every binary shares: user errors become one line on stderr and exit status 1.

Also: SIGINT/SIGTERM that a run turned into a clean stop exit 128 + signum with one line, and the
operating-system errors a user can fix (disk full, read-only or not-a-directory paths) become one line
naming the path and the fix.
"""

import contextlib
import errno
import os
import sys

from absl import app, logging

from metasae_jax.core.errors import Interrupted, UserError
from metasae_jax.storage import lock, store

_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space (or pick another output directory) and rerun the same "
                  "command; it resumes from what was saved",
    errno.EDQUOT: "the disk quota is exhausted: free space and rerun the same command",
    errno.EACCES: "permission denied: fix the permissions or pick a directory you can write",
    errno.EPERM: "operation not permitted: fix the permissions or pick a directory you can write",
    errno.EROFS: "the file system is read-only: pick a writable directory",
    errno.ENOTDIR: "a component of the path is a file, not a directory: pick another path",
    errno.EISDIR: "the path is a directory where a file was expected: pick another path",
    errno.EEXIST: "something already exists at this path: remove it or pick another path",
}


def os_error_line(e: OSError) -> str:
  """One readable line for an OSError: what happened, where, and the fix."""
  where = e.filename if e.filename is not None else "an output file"
  if e.filename2 is not None:
    where = f"{where} -> {e.filename2}"
  fix = _OS_FIXES.get(e.errno, "check the path and rerun")
  return f"{e.strerror or e} at {where}: {fix}."


def check_store(path: str) -> None:
  """Validates a store a binary reads in full (evaluation, autointerp, browser), NaN/Inf included."""
  store.check_finite(store.open_store(path))


def writing_into(run_dir: str):
  """The run directory's lock while a binary writes into it (no-op for a missing directory: its own error)."""
  if not os.path.isdir(run_dir):
    return contextlib.nullcontext()
  return lock.DirLock(run_dir, "run directory")


def run(main) -> None:
  """`app.run(main)`, turning a UserError into `error: <message>` and exit code 1 (no traceback)."""

  def wrapped(argv):
    # Orbax logs every checkpoint step at INFO through absl; keep the terminal for the progress bar.
    if logging.get_verbosity() == logging.INFO:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    except Interrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # binaries without a step loop (exporter, evaluation): stop, no traceback
      print("interrupted; rerun the same command to resume (finished parts are kept)", file=sys.stderr)
      sys.exit(130)
    except OSError as e:
      if e.errno not in _OS_FIXES:
        raise
      print(f"error: {os_error_line(e)}", file=sys.stderr)
      # Skip interpreter shutdown: writer threads of a failed checkpoint save would print tracebacks there.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)

  app.run(wrapped)
