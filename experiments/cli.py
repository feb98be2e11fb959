"""What every binary shares: user errors become one line on stderr and exit status 1.

Also: SIGINT/SIGTERM that a run turned into a clean stop exit 128 + signum with one line, and the
operating-system errors a user can fix (disk full, read-only or not-a-directory paths) become one line
naming the path and the fix.
"""

import contextlib
import errno
import logging as std_logging  # only to filter Orbax's records on absl's handler
import os
import sys

from absl import app, flags, logging

from experiments import cli_flags
from metasae_jax.core.errors import Interrupted, UserError
from metasae_jax.lm import export_config, model_files, tokens  # the torch-free part of lm/
from metasae_jax.storage import artifact, atomic, location, lock, sae_schema, store
from metasae_jax.training import run_config

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
    errno.ELOOP: "the path goes through a loop of symbolic links: remove the link or pick another path",
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
  store.open_store(path).check_finite()


def check_out_dir(path: str, flag: str = "--out_dir", remote_ok: bool = False) -> None:
  """An output directory that can be created or written (checked before anything heavy is imported): not a
  file, not below a file, writable, and no symbolic link loop or dangling link on the way. `remote_ok`: an
  s3:// or gs:// location is fine too (activation stores; its writer checks it when it connects)."""
  if remote_ok and location.is_remote(path):
    return
  if path:
    try:
      os.stat(path)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise UserError(f"{flag} {path} goes through a loop of symbolic links; remove the link or pick another "
                        "path (nothing was written).") from None
      if e.errno == errno.ENOENT and os.path.islink(path):
        raise UserError(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
                        "that directory or pick another path (nothing was written).") from None
  atomic.check_output_dir(path, flag)


def run_sae_cfgs(run_dir: str, names=artifact.SAE_NAMES, need: int = 1, flag: str = "--run_dir") -> dict:
  """name -> checked cfg.json of the run's SAEs present among `names` (at least `need` of them), read without
  JAX: the weights are checked in full when they load; this refuses a wrong folder before anything heavy."""
  if not os.path.isdir(run_dir):
    raise UserError(f"{flag} {run_dir} does not exist; point it at a directory written by experiments.train.")
  cfgs = {}
  for name in names:
    path = os.path.join(run_dir, name)
    if not os.path.isdir(path):
      continue
    for file_name in (artifact.CFG, artifact.WEIGHTS):
      if not os.path.isfile(os.path.join(path, file_name)):
        raise UserError(f"SAE artifact {path}: missing {file_name}. Train or resume the run to finish it "
                        "(experiments.train), or point at a finished run.")
    cfg = artifact.read_cfg(path)
    sae_schema.check_cfg(path, cfg)
    cfgs[name] = cfg
  if len(cfgs) < need:
    missing = [n for n in names if n not in cfgs]
    raise UserError(f"{flag} {run_dir} has no {' or '.join(f'{n}/' for n in missing)} SAE"
                    f"{'s' if len(missing) > 1 else ''}; train first (experiments.train, with the solo baseline "
                    "for joint-vs-solo tools) or point at the run directory.")
  return cfgs


def check_sae_store(cfgs: dict, activations: str, run_dir: str, require_tokens: bool = False) -> store.Store:
  """The evaluation store, opened, with the run's SAEs' d_model checked against it."""
  s = store.open_store(activations, require_tokens=require_tokens)
  for name, cfg in cfgs.items():
    if cfg["d_model"] != s.d_model:
      raise UserError(f"SAE artifact {os.path.join(run_dir, name)} has d_model {cfg['d_model']} but the activation "
                      f"store {activations} has d_model {s.d_model}. Evaluate it on activations from the model "
                      f"and layer it was trained on (its cfg.json source: {cfg.get('source')}).")
  return s


def check_model(name: str, s=None, layer=None, site=None, runs_on_store: bool = False) -> None:
  """What can be known of `--model` from its files before torch loads it: it exists; its blocks hold `layer`;
  the store's token ids are in its vocabulary; and when it runs on the store's activations (ΔCE), its width is
  the store's d_model."""
  found = model_files.shape(name)
  if found is None:
    return
  if layer is not None:
    model_files.check_site(int(layer), site or "resid_pre", found.num_layers)
  if s is None:
    return
  if found.vocab_size:
    tokens.check_ids(s, found.vocab_size, f"model {name}")
  if runs_on_store and found.d_model and s.source.get("site") in model_files.SITES and found.d_model != s.d_model:
    raise UserError(f"--model {name} has a residual width of {found.d_model}, but the activation store {s.path} has "
                    f"d_model {s.d_model}. Pass the --model the store was exported from "
                    f"({s.source.get('model')!r}).")


def hooked_sae(run_dir: str, name: str) -> dict:
  """cfg.json of the run's SAE `name`, checked (no JAX), with the layer and site it hooks."""
  cfg = run_sae_cfgs(run_dir, (name,))[name]
  source = cfg.get("source") or {}
  if not isinstance(source.get("layer"), int) or not isinstance(source.get("site"), str):
    raise UserError(f"{os.path.join(run_dir, name)}/cfg.json has no source.layer/site: it was not trained on a "
                    "model's activations, so there is no layer to hook.")
  return cfg


def check_pipeline(c, out_dir: str) -> None:
  """A whole-job config (`reproduce`, `demo`) before anything heavy: the output directory, and its export
  section against the model's files and the corpus (the model loads only after these pass)."""
  check_out_dir(out_dir)
  export_config.preflight(export_config.ExportConfig(out_dir="-", **c.export.to_dict()))


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
        values = flags.FLAGS[old].value, flags.FLAGS[new].value
        if values[0] != values[1]:
          raise UserError(f"--{old}={values[0]} (deprecated) and --{new}={values[1]} disagree; pass only --{new}.")
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
  return run_config.recorded_activations(run_dir)


# What evaluating a run takes from the run unless told otherwise: the batch BatchTopK firing and θ calibration
# select over, and the positions it skipped.
TRAINED_WITH = ("batch_size", "skip_first_positions")


def trained_with(run_dir: str, cfgs: dict, names=TRAINED_WITH) -> dict:
  """The values of `names` (of TRAINED_WITH) the run in `run_dir` trained with: its run_config.json, else its
  SAEs' cfg.json (`cfgs`, from run_sae_cfgs; a published artifact records both). One neither records is left out."""
  found = {"batch_size": run_config.recorded_batch_size(run_dir),
           "skip_first_positions": run_config.recorded_skip_first_positions(run_dir)}
  for cfg in cfgs.values():
    if found["batch_size"] is None:
      found["batch_size"] = (cfg.get("train_config") or {}).get("batch_size")
    if found["skip_first_positions"] is None:
      found["skip_first_positions"] = cfg.get("skip_first_positions")
  out = {k: int(v) for k, v in found.items() if k in names and isinstance(v, int) and not isinstance(v, bool)}
  if out:
    logging.info("as %s trained: %s (pass %s to change)", run_dir, ", ".join(f"{k} {v}" for k, v in out.items()),
                 " / ".join(f"--{k}" for k in out))
  return out


def split_views(path: str):
  """(train view, held-out view) of a store, given the store or either view; None if it has no split.

  Two layouts: the exporter's, STORE/train and STORE/heldout; and the pipeline's (`make demo`, `reproduce`):
  DATA/store with the views DATA/train and DATA/heldout beside it, which must view that store without
  sharing a token.
  """
  split = store.split_of(path)
  if split is not None:
    return split
  base = store.base_of(path)
  parent = location.resolve(base, "..")
  views = tuple(location.join(parent, v) for v in (store.TRAIN_VIEW, store.HELDOUT_VIEW))
  if not all(store.exists(v) for v in views):
    return None
  bases = {store.token_ranges(v)[0] for v in views}
  if bases != {store.token_ranges(base)[0]} or store.shared_tokens(*views):
    return None
  return views


def training_view(activations: str, out_dir: str) -> str:
  """What `train` reads for `--activations`: the training view when the store has a split (`split_views`).

  A run already started on the whole store keeps it (its run_config.json records the store it resumes on).
  """
  split = split_views(activations)
  if split is None or "view_of" in store.read_manifest(activations):
    return activations
  if recorded_activations(out_dir) == location.normalize(activations):
    return activations
  logging.info("%s has a held-out split: training on its training view %s", activations, split[0])
  return split[0]


def evaluation_store(activations, trained, allow_train_tokens: bool, what: str, flag: str = "--activations") -> str:
  """The store to evaluate on: `activations`, or by default the held-out view of the store the run trained on.

  Refuses (one line with the fix) a store that shares tokens with `trained` unless allow_train_tokens.
  """
  split = None
  trained_exists = bool(trained) and store.exists(trained)
  if trained_exists:
    split = split_views(trained)
  if not activations:
    if split is None:
      if trained:
        raise UserError(f"{flag} is required: the run trained on {trained}, which has no held-out view beside it "
                        "(neither STORE/heldout as the exporter writes it nor DATA/heldout as make demo does). "
                        f"Pass a held-out store with {flag}.")
      raise UserError(f"{flag} is required: {what} records no training store. Pass a held-out store.")
    activations = split[1]
  if trained_exists and not allow_train_tokens:
    shared = store.shared_tokens(activations, trained)
    if shared:
      fix = f"use its held-out view {split[1]}" if split and split[1] != activations else "pass a held-out store"
      raise UserError(f"{flag} {activations} shares {shared} tokens with {trained}, which {what} was "
                      f"trained on; {fix} (or pass --allow_train_tokens to evaluate on training tokens on purpose).")
  return activations
