"""What every binary shares: user errors become one line on stderr and exit status 1.

Also: SIGINT/SIGTERM that a run turned into a clean stop exit 128 + signum with one line, and the
operating-system errors a user can fix (disk full, read-only or not-a-directory paths) become one line
naming the path and the fix.
"""

import contextlib
import errno
import json
import logging as std_logging  # only to filter Orbax's records on absl's handler
import os
import sys

from absl import app, flags, logging

from experiments import cli_flags
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


_ALIASES = []  # (old flag, new flag) pairs registered by deprecated_alias


def deprecated_alias(old: str, new: str) -> None:
  """Accepts `--old` for one release: its value goes to `--new` (which must not be given too) with a warning.

  The old flag is defined in this module, so a binary's `--help` lists only the new name (`--helpfull` shows both).
  """
  target = flags.FLAGS[new]
  if target.boolean:
    flags.DEFINE_bool(old, None, f"Deprecated: use --{new}.")
  else:  # the new flag's parser, so --old takes the same values (an integer stays an integer)
    flags.DEFINE(target.parser, old, None, f"Deprecated: use --{new}.", serializer=target.serializer)
  _ALIASES.append((old, new))


def internal_flag(define, name: str, default, help_text: str):
  """Defines a flag for the project's own subprocesses here, so the binary's `--help` does not list it."""
  return define(name, default, f"Internal: {help_text}")


def _apply_aliases() -> None:
  for old, new in _ALIASES:
    if flags.FLAGS[old].present:
      if flags.FLAGS[new].present:
        raise UserError(f"--{old} is the deprecated name of --{new}; pass only --{new}.")
      logging.warning("--%s is deprecated and will be removed; use --%s.", old, new)
      flags.FLAGS[new].value = flags.FLAGS[old].value
      flags.FLAGS[new].present = 1


# Libraries that log routine INFO through absl: Orbax (one line per checkpoint step), JAX (backend probing).
_CHATTY = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "jax"))


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's and JAX's INFO records unless the user asked for DEBUG (--verbosity=1); ours pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING or logging.get_verbosity() >= logging.DEBUG:
      return True
    return not any(part in (record.pathname or "") for part in _CHATTY)


def quiet_orbax() -> None:
  """Keeps the terminal for the progress bar: Orbax and JAX log through absl, so their records are filtered by
  origin (a logger per library does not exist there); --verbosity still applies to everything else."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


def run(main) -> None:
  """`app.run(main)`, turning a UserError into `error: <message>` and exit code 1 (no traceback).

  absl's own `--verbosity` / `--logtostderr` / `--log_dir` are respected; only Orbax's INFO chatter is filtered.
  """

  def wrapped(argv):
    quiet_orbax()
    try:
      _apply_aliases()
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

  app.run(wrapped, flags_parser=cli_flags.parse)


def model_flag(recorded, what: str, name: str = "model") -> str:
  """--model's value: as given; by default the built-in model, refused when `what` records another model.

  `recorded` is the model named in the store's or SAE's source (None/"" if none). Defaulting to the
  built-in model for activations taken from another model would splice the SAE into the wrong model,
  so that case is one error naming the fix instead of a silent guess.
  """
  holder = flags.FLAGS[name]
  if holder.present:
    if recorded and holder.value not in (recorded, "none"):
      logging.warning("--%s %s differs from the model %s was made from (%s); using --%s as given.",
                      name, holder.value, what, recorded, name)
    return holder.value
  if recorded and recorded != store.BUILTIN_MODEL:
    raise UserError(f"{what} was made from model {recorded!r}, but --{name} defaults to the built-in "
                    f"{store.BUILTIN_MODEL!r}. Pass --{name} {recorded} (a local copy of it works too).")
  return holder.value


def recorded_activations(run_dir: str):
  """The store (or view) a training run in `run_dir` recorded in run_config.json; None if it records none."""
  try:
    with open(os.path.join(run_dir, "run_config.json")) as f:
      value = json.load(f).get("data", {}).get("activations")
  except (OSError, ValueError, AttributeError):
    return None
  return value if isinstance(value, str) else None


def training_view(activations: str, out_dir: str) -> str:
  """What `train` reads for `--activations`: the training view when the store has an exporter split.

  A run already started on the whole store keeps it (its run_config.json records the store it resumes on).
  """
  split = store.split_of(activations)
  if split is None or "view_of" in store.read_manifest(activations):
    return activations
  if recorded_activations(out_dir) == os.path.abspath(activations):
    return activations
  logging.info("%s has a held-out split: training on its training view %s", activations, split[0])
  return split[0]


def evaluation_store(activations, trained, allow_train_tokens: bool, what: str, flag: str = "--activations") -> str:
  """The store to evaluate on: `activations`, or by default the held-out view of the store the run trained on.

  Refuses (one line with the fix) a store that shares tokens with `trained` unless allow_train_tokens.
  """
  split = None
  if trained and os.path.isdir(trained):
    split = store.split_of(trained)
  if not activations:
    if split is None:
      where = f"the run trained on {trained}, which has no held-out view" if trained else (
          f"{what} records no training store")
      raise UserError(f"{flag} is required: {where}. Pass a held-out store, or re-export with "
                      "experiments.export_activations (it writes STORE/heldout) and train on that store.")
    activations = split[1]
  if trained and os.path.isdir(trained) and not allow_train_tokens:
    shared = store.shared_tokens(activations, trained)
    if shared:
      fix = f"use its held-out view {split[1]}" if split else "pass a held-out store"
      raise UserError(f"{flag} {activations} shares {shared} tokens with {trained}, which {what} was "
                      f"trained on; {fix} (or pass --allow_train_tokens to evaluate on training tokens on purpose).")
  return activations
