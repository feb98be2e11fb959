"""Orbax training checkpoints: train state and data cursor saved together.

These are for resuming, not for publishing: a finished SAE is an artifact
(`artifact.py`), written separately. Each cursor carries a digest of the state's
bytes, so a restore that silently returns damaged values (a flipped bit in an
array file) is caught like one that fails outright.
"""

import contextlib
import gc
import hashlib
import os
import re
import sys
import tempfile
import time
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from metasae_jax.core.errors import UserError
from metasae_jax.core.train_step import TrainState
from metasae_jax.training import sharding

DIGEST = "state_sha256"


def state_digest(state: TrainState) -> str:
  """sha256 over every leaf's dtype, shape and bytes (host copy), in tree order."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(sharding.host_copy(state)):
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# After a failed save, tensorstore's callbacks keep failing into the closed event loop for a moment (each
# prints a traceback from its own thread). The window stays shut until they have been quiet this long.
_QUIET_AFTER_FAILURE_S = 1.0
_MAX_WAIT_AFTER_FAILURE_S = 10.0


def _wait_until_quiet(held, quiet_s: float = _QUIET_AFTER_FAILURE_S,
                      max_wait_s: float = _MAX_WAIT_AFTER_FAILURE_S) -> None:
  """Returns once nothing has been written to `held` for quiet_s seconds (or after max_wait_s)."""
  start = last_change = time.monotonic()
  size = os.fstat(held.fileno()).st_size
  while True:
    time.sleep(0.05)
    now = time.monotonic()
    grown = os.fstat(held.fileno()).st_size
    if grown != size:
      size, last_change = grown, now
    if now - last_change >= quiet_s or now - start >= max_wait_s:
      return


@contextlib.contextmanager
def _orbax_quiet():
  """Orbax's writer threads print a traceback per failed file (dozens on a full disk, through absl logging
  and straight to fd 2 from tensorstore callbacks) before the save raises, and some after. The caller reports
  the one error that matters, so stderr is held back meanwhile: replayed if the save succeeds; if it fails,
  dropped once the writers have gone quiet (a traceback split across the window's end would leave half of
  itself on the terminal)."""
  old = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.FATAL)
  sys.stderr.flush()
  saved_fd = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      if failed:
        _wait_until_quiet(held)
      sys.stderr.flush()
      os.dup2(saved_fd, 2)
      os.close(saved_fd)
      absl_logging.set_verbosity(old)
      if not failed:
        held.seek(0)
        noise = held.read()
        if noise:
          os.write(2, noise)


def _as_os_error(e: Exception, directory: str) -> Exception:
  """The OSError behind a tensorstore/Orbax error (`[os_error_code='28']`), so binaries report it in one line."""
  if isinstance(e, OSError):
    return e if e.filename is not None else OSError(e.errno, e.strerror, directory)
  found = re.search(r"os_error_code='(\d+)'", str(e)) or re.search(r"\[Errno (\d+)\]", str(e))
  if not found:
    return e
  code = int(found.group(1))
  return OSError(code, os.strerror(code), directory)


class Checkpointer:
  """Saves {state, cursor} every so often; restores the newest one that is intact into a template state."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._mgr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False),
        item_names=("state", "cursor"))

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def all_steps(self) -> list:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state: TrainState, cursor: dict) -> None:
    cursor = dict(cursor, **{DIGEST: state_digest(state)})
    try:
      with _orbax_quiet():
        self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     cursor=ocp.args.JsonSave(cursor)))
    except Exception as e:  # noqa: BLE001
      raise _as_os_error(e, str(self._mgr.directory)) from e

  def restore(self, template: TrainState, step: Optional[int] = None) -> tuple[TrainState, dict]:
    """One step's {state, cursor}; raises whatever Orbax raises, or ValueError on a digest mismatch."""
    step = self._mgr.latest_step() if step is None else step
    # A template of ShapeDtypeStructs with shardings restores straight onto that layout (any mesh).
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          cursor=ocp.args.JsonRestore()))
    cursor = out["cursor"]
    if not isinstance(cursor, dict):
      raise ValueError(f"cursor is {type(cursor).__name__}, not an object")
    # Checkpoints written before digests existed have none; they restore as before.
    if DIGEST in cursor and cursor[DIGEST] != state_digest(out["state"]):
      raise ValueError("state bytes differ from the digest saved with them")
    return out["state"], cursor

  def restore_newest_intact(self, template: TrainState,
                            check: Callable[[int, TrainState, dict], None]) -> tuple[Optional[TrainState], dict]:
    """Newest checkpoint that restores and passes `check(step, state, cursor)` (raise to reject).

    Damaged newer ones get one line on stderr each and, once an older one restores, are deleted (the resumed
    run saves those steps again).
    Returns (None, {}) if there are no checkpoints; raises UserError if none restores.
    """
    steps = self.all_steps()
    if not steps:
      return None, {}
    directory = str(self._mgr.directory)
    with _swallow_unraisable():
      return self._restore_newest(template, check, steps, directory)

  def _restore_newest(self, template, check, steps, directory):
    for step in reversed(steps):
      try:
        state, cursor = self.restore(template, step)
        check(step, state, cursor)
      except Exception as e:  # noqa: BLE001  (Orbax/tensorstore/JSON raise many types on damaged files)
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        print(f"warning: checkpoint {step} in {directory} cannot be restored ({type(e).__name__}: {reason}); "
              "trying an older one.", file=sys.stderr)
        continue
      for newer in [s for s in steps if s > step]:
        self._mgr.delete(newer)
      return state, cursor
    raise UserError(f"no checkpoint in {directory} restores (tried steps {steps}; see the warnings above). "
                    "Delete that directory's checkpoints/ to start the run over.")

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    with _orbax_quiet():
      self._mgr.wait_until_finished()
      self._mgr.close()


@contextlib.contextmanager
def _swallow_unraisable():
  """Keeps a failed restore to its one warning line.

  A damaged array file makes Orbax abandon its read coroutines; when they are collected Python prints
  "Exception ignored in: <coroutine ...>" and a traceback, at a moment that depends on GC timing. They
  are collected here, inside the window, with the report of unraisable exceptions silenced.
  """
  old = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = old
