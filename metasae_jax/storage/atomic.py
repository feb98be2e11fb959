"""Atomic file writes: temp file in the same directory, fsync, rename.

A reader (or a process killed half-way) sees either the old file or the new one,
never a partial one.
"""

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np

from metasae_jax.core.errors import UserError


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


TEMP_SUFFIX = ".tmp"


def _file_mode() -> int:
  """0o666 minus the process umask: what `open(path, "w")` would create (mkstemp makes 0600)."""
  # The umask can only be read by setting it; set it straight back (writes here are not racing umask changes).
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


def is_temp(name: str) -> bool:
  """True for the name of a temp file `write_with` leaves behind when killed before its rename."""
  return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def remove_stale_temps(directory: str) -> list:
  """Deletes temp files a killed writer left in `directory` (one writer per directory). Returns their names."""
  if not os.path.isdir(directory):
    return []
  stale = sorted(n for n in os.listdir(directory) if is_temp(n) and os.path.isfile(os.path.join(directory, n)))
  for name in stale:
    os.remove(os.path.join(directory, name))
  return stale


def write_with(path: str, writer: Callable[[Any], None], mode: str = "wb") -> None:
  """Calls `writer(fileobj)` on a temp file, then renames it over `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=directory)
  try:
    os.fchmod(fd, _file_mode())  # outputs are shared: same permissions as any other file the user writes
    with os.fdopen(fd, mode) as f:
      writer(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file; say which
      raise OSError(e.errno, e.strerror, path) from e
    raise
  _fsync_dir(directory)


def write_bytes(path: str, data: bytes) -> None:
  write_with(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npy(path: str, array: np.ndarray) -> None:
  write_with(path, lambda f: np.save(f, array, allow_pickle=False))


def check_output_dir(path: str, flag: str) -> None:
  """Refuses, before anything is written, an output directory that is a file or cannot be created or written."""
  if not path:
    raise UserError(f"{flag} is empty; pass the directory to write to.")
  if "://" in path:
    raise UserError(f"{flag} {path} is not a local directory: run directories (checkpoints, SAE artifacts, "
                    "reports) are written on local disk; activation stores may live on s3:// or gs:// "
                    "(docs/storage.md). Pass a local path (nothing was written).")
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path} is a file, not a directory. Pass a directory path (nothing was written).")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag} {path} cannot be created: {parent} is a file. Pass another path (nothing was written).")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{flag} {path} is not writable ({parent} is read-only or not yours). Pass a writable "
                    "directory, or fix its permissions (nothing was written).")
