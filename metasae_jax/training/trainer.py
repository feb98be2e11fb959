"""The training loop: store → jitted step (once, donated, sharded) → checkpoints → SAE artifacts."""

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from metasae_jax.storage import artifact, atomic, location
from metasae_jax.training import curves, data, sharding, tracking, validation
from metasae_jax.training.checkpoint import Checkpointer
# Defined without a JAX import (binaries check flags before importing this module); public here too.
from metasae_jax.training.run_config import (RUN_CONFIG, RunConfig, recorded_data_streams,  # noqa: F401
                                             recorded_skip_first_positions,
                                             validate_run)
from metasae_jax.core import architectures
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import Interrupted, UserError
from metasae_jax.storage import lock as lock_lib
from metasae_jax.storage import store as store_lib
from metasae_jax.storage.store import open_store
from metasae_jax.core.train_step import TrainState

METRICS = "metrics.jsonl"
# What a run directory holds; any of them without RUN_CONFIG means someone else's files.
RUN_FILES = (*artifact.SAE_NAMES, "checkpoints", METRICS)


def _identity(config: TrainConfig, run: RunConfig, store, source: data.BatchSource, platform: str) -> dict:
  """What a run is, to refuse resuming it with other settings: the math and the data, not the layout.

  The mesh (model_parallel) and the algorithm (slots or dense: the same loss)
  are left out, so a run moves between meshes and hosts; the compute dtype is
  recorded as it resolves on this platform ("auto" is float32 on CPU).
  """
  train = json.loads(json.dumps(config.to_dict()))  # as the file holds it (tuples are lists)
  del train["algorithm"]
  train["compute_dtype"] = config.resolved(platform)[1]
  return {"train": train,
          "data": {"activations": location.normalize(run.activations), "store_tokens": store.num_tokens,
                   "d_model": store.d_model, "num_tokens": run.num_tokens,
                   "skip_first_positions": run.skip_first_positions,
                   "shuffle_buffer_tokens": run.shuffle_buffer_tokens, "data_streams": source.num_streams},
          "store": store_lib.fingerprint(store)}


# Data-order fields runs from before chunked reading did not record; they read the whole-store permutation, which
# the reader reproduces when one stream's window holds the whole store.
_READER_FIELDS = ("shuffle_buffer_tokens", "data_streams")


def _legacy_order(source: data.BatchSource) -> bool:
  return source.num_streams == 1 and source.window_chunks >= source.store.num_chunks


def _upgraded(old: dict) -> dict:
  """A run config as this version writes it: `activation` became `architecture`; a training field added
  since the run started is recorded at its default (which is what that run trained with)."""
  train = dict(old.get("train", {}))
  if "activation" in train and "architecture" not in train:
    train["architecture"] = train.pop("activation")
  for f in dataclasses.fields(TrainConfig):
    if f.name not in train and f.default is not dataclasses.MISSING and f.name not in ("algorithm",):
      train[f.name] = json.loads(json.dumps(f.default))
  return dict(old, train=train)


def _claim_out_dir(out_dir: str, identity: dict, writer: bool, legacy_order: bool = False) -> bool:
  """Refuses a run directory that holds a run with another config or data; never overwrites it.

  Returns True if this call wrote RUN_CONFIG into a directory that held no run.
  """
  path = os.path.join(out_dir, RUN_CONFIG)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path} is damaged. Use a new --out_dir (this one is left untouched).")
    if not isinstance(old, dict):
      raise UserError(f"{path} is not a run config. Use a new --out_dir (this one is left untouched).")
    old = _upgraded(old)
    diffs = [f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}"
             for section, fields in identity.items() if section != "store" for key, value in fields.items()
             if old.get(section, {}).get(key) != value
             and not (legacy_order and key in _READER_FIELDS and key not in old.get(section, {}))]
    if diffs:
      raise UserError(f"--out_dir {out_dir} holds a run with a different config ({'; '.join(diffs)}). "
                      "Rerun with the original flags to resume, or pick a new --out_dir.")
    if "store" not in old:  # a run from before data fingerprints: trust the path, record the data from now on
      if writer:
        atomic.write_json(path, dict(old, store=identity["store"]))
      return False
    changes = store_lib.fingerprint_changes(old["store"], identity["store"])
    if changes:
      raise UserError(f"the activation store {identity['data']['activations']} is not the one this run in "
                      f"{out_dir} was trained on ({'; '.join(changes)}). Point --activations at the original "
                      "store to resume, or train on this one in a new --out_dir.")
    return False
  found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
  if found:
    raise UserError(f"--out_dir {out_dir} holds {', '.join(found)} but no {RUN_CONFIG}, so it is not a run "
                    "this command can resume. Pick a new --out_dir (nothing was changed).")
  if writer:
    atomic.write_json(path, identity)
  return writer


def _trim_metrics(path: str, last_step: int) -> None:
  """Drops log lines past the checkpoint we resume from, so a resumed log equals an uninterrupted one."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          lines.append(line)
      except (json.JSONDecodeError, KeyError, TypeError):
        break  # a line torn by a kill mid-append: it and anything after it are past the checkpoint
  atomic.write_text(path, "".join(lines))


def write_artifacts(state: TrainState, store, run: RunConfig, trained_tokens: int) -> None:
  config = state.config
  host = sharding.host_copy(state)
  if jax.process_index() != 0:
    return
  out = run.out_dir

  # Which data the SAEs were trained on, beyond the store's path (a store can be replaced in place).
  data = {"store_fingerprint": store_lib.fingerprint(store)}

  def cfg(which):
    return dict(artifact.sae_cfg(which, config.to_dict(), trained_tokens, source=store.source,
                                 skip_first_positions=run.skip_first_positions, context_len=store.context_len),
                **data)

  arch = architectures.get(config.architecture)  # a trained threshold (JumpReLU's θ) goes into the artifact
  artifact.save_sae(os.path.join(out, "joint"), host.joint.params, cfg("joint"),
                    threshold_N=arch.artifact_threshold(host.joint.params))
  artifact.save_sae(os.path.join(out, "joint", "meta"), host.meta.params, cfg("meta"))
  if host.solo is not None:
    artifact.save_sae(os.path.join(out, "solo"), host.solo.params, cfg("solo"),
                      threshold_N=arch.artifact_threshold(host.solo.params))


def _artifacts_complete(config: TrainConfig, out_dir: str) -> bool:
  """Every artifact file of a finished run is there (each is written atomically, so present means whole)."""
  subs = ["joint", os.path.join("joint", "meta")] + (["solo"] if config.baseline else [])
  return all(os.path.isfile(os.path.join(out_dir, sub, name))
             for sub in subs for name in (artifact.CFG, artifact.WEIGHTS))


class _StopSignals:
  """SIGINT/SIGTERM only set a flag, checked at step boundaries.

  Installed before jit compilation: the default SIGINT handler raises KeyboardInterrupt wherever Python
  happens to be (inside XLA compilation, a prefetch future, an Orbax write), which gave tracebacks and
  crashes instead of a saved state.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._old: dict = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __enter__(self) -> "_StopSignals":
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _undo_claim(out_dir: str, fresh_dir: bool, lock: Optional[lock_lib.DirLock]) -> None:
  """Removes what a first attempt created before doing real work, so the corrected command just works."""
  if fresh_dir:
    shutil.rmtree(out_dir, ignore_errors=True)
    return
  for name in (RUN_CONFIG, METRICS):
    try:
      os.remove(os.path.join(out_dir, name))
    except FileNotFoundError:
      pass
  shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
  if lock is not None:
    lock.release(remove_file=True)


class _MetricsSink:
  """Reads step metrics one step late, stops on non-finite values, logs every few steps (with tokens/s)."""

  def __init__(self, tracker, batch_size: int, log_every: int, total: int, start_step: int):
    self.tracker, self.batch_size, self.log_every, self.total = tracker, batch_size, log_every, total
    self.last: dict = {}
    self.clock = (time.time(), start_step)

  def consume(self, step: int, metrics, last_good: Optional[int]) -> dict:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in m.items() if not math.isfinite(v))
    if bad:
      where = f"the last good checkpoint (step {last_good}) is intact" if last_good else "no checkpoint was written"
      raise UserError(f"training diverged: non-finite {', '.join(bad)} at step {step}; {where}. "
                      "Lower --lr or check the activations for outliers.")
    self.last = m
    if self.tracker is not None and (step % self.log_every == 0 or step == self.total):
      now = time.time()
      # Throughput since the previous log line (the first one includes compilation).
      then, then_step = self.clock
      self.clock = (now, step)
      rate = (step - then_step) * self.batch_size / max(now - then, 1e-9)
      self.tracker.log(step, {**m, "tokens_per_s": rate})
    return m


def train_and_save(config: TrainConfig, run: RunConfig) -> dict:
  """Trains (or resumes) joint + solo SAEs and writes the artifacts. Returns the last metrics ({} if finished).

  Raises Interrupted after saving a checkpoint if SIGINT/SIGTERM arrived; rerunning resumes.
  """
  with _StopSignals() as stop:  # first thing: a Ctrl-C anywhere below ends at a step boundary, not mid-write
    return _train_and_save(config, run, stop)


def _train_and_save(config: TrainConfig, run: RunConfig, stop: _StopSignals) -> dict:
  validate_run(config, run)
  store = open_store(run.activations)
  if store.d_model != config.d_model:
    raise UserError(f"activation store {run.activations} has d_model {store.d_model} but the config says "
                    f"{config.d_model}.")
  writer = jax.process_index() == 0
  dp = sharding.Mesh(config, run.model_parallel)
  # The rows of the global batch this process's devices hold: slice `rows_index` of `rows_count`.
  rows_index, rows_count = dp.process_rows()
  streams = run.data_streams or recorded_data_streams(run.out_dir) or rows_count
  source = data.BatchSource(store, config.batch_size, config.seed, run.skip_first_positions, rows_index, rows_count,
                            shuffle_buffer_tokens=run.shuffle_buffer_tokens, streams=streams)
  total = (run.num_tokens // config.batch_size) if run.num_tokens else source.batches_per_epoch
  if total <= 0:
    raise UserError(f"--num_tokens {run.num_tokens} is less than one batch of {config.batch_size}.")
  validator = _validator(config, run)
  identity = _identity(config, run, store, source, dp.platform)
  # Everything above only reads; from here on the run directory is ours alone.
  fresh_dir = not os.path.exists(run.out_dir)
  lock = lock_lib.DirLock(run.out_dir, "run directory").acquire() if writer else None
  claimed = False
  progress = {"saved": False}
  try:
    claimed = _claim_out_dir(run.out_dir, identity, writer, _legacy_order(source))
    return _train(config, run, store, source, dp, total, writer, stop, progress, validator)
  except Interrupted:
    raise
  except BaseException:
    # Real work (a checkpoint, a logged step) is kept; a failure before any leaves the directory as found.
    if claimed and not progress["saved"] and not os.path.exists(os.path.join(run.out_dir, METRICS)):
      _undo_claim(run.out_dir, fresh_dir, lock)
    raise
  finally:
    if lock is not None:
      lock.release()


def _validator(config: TrainConfig, run: RunConfig) -> Optional[validation.Validator]:
  """The held-out sample, loaded before the run directory is touched (a bad path must leave nothing behind)."""
  if not run.eval_every_steps:
    return None
  path = validation.heldout_store_path(run.activations, run.eval_activations)
  if path is None:
    raise UserError(f"--eval_every_steps needs held-out activations: pass --eval_activations HELDOUT_STORE "
                    f"(the store {run.activations} records no held-out view). Nothing was written.")
  sample = validation.load_sample(path, run.eval_tokens, run.skip_first_positions, config.d_model)
  return validation.Validator(sample, config.k, config.architecture)


def _train(config: TrainConfig, run: RunConfig, store, source, dp, total: int, writer: bool,
           stop: _StopSignals, progress: dict, validator=None) -> dict:
  ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), run.max_checkpoints)
  try:
    if ckpt.latest_step() == total and _artifacts_complete(config, run.out_dir):
      return {}  # finished is finished: touch nothing (evaluate may have added thresholds to the artifacts)
    if writer:  # temp files of atomic writes cut short by a kill (Orbax cleans its own)
      for sub in ("", *artifact.SAE_NAMES, os.path.join("joint", "meta")):
        atomic.remove_stale_temps(os.path.join(run.out_dir, sub))

    def consistent(step, state, cursor):
      if cursor.get("batches_consumed") != step or int(state.step) != step:
        raise ValueError(f"cursor {cursor} does not match step {step}")

    restored, _ = ckpt.restore_newest_intact(dp.abstract(), consistent)
    state = dp.init_state() if restored is None else restored
    return _loop(config, run, store, source, dp, total, writer, stop, progress, ckpt, state, validator)
  finally:
    ckpt.close()


def _loop(config, run, store, source, dp, total, writer, stop, progress, ckpt, state, validator) -> dict:
  start = int(state.step)
  last_good = start or None
  metrics_path = os.path.join(run.out_dir, METRICS)
  if writer:
    _trim_metrics(metrics_path, start)
  tracker = None
  if writer:
    tracker = tracking.open_trackers(run.log_to, run.out_dir, metrics_path, config.batch_size, start,
                                     run.wandb_project, run.wandb_run_name or None, run.wandb_mode)
    tracker.hparams({"train": config.to_dict(), "run": dataclasses.asdict(run)})
  try:
    metrics = _steps(config, run, store, source, dp, total, writer, stop, progress, ckpt, state, validator,
                     tracker, start, last_good)
  finally:
    if tracker is not None:
      tracker.close()
  if writer and run.curves:
    curves.plot_training_curves(run.out_dir)
  return metrics


def _steps(config, run, store, source, dp, total, writer, stop, progress, ckpt, state, validator, tracker,
           start, last_good) -> dict:
  step_fn = dp.step_fn()
  sink = _MetricsSink(tracker, config.batch_size, run.log_every_steps, total, start)
  prefetch = data.Prefetcher(source, dp.put_batch)
  bar = tqdm(total=total * config.batch_size, initial=start * config.batch_size, unit="tok",
             unit_scale=True, desc="train", disable=not (run.progress and writer), smoothing=0.1)
  pending = None
  step = start
  try:
    for step in range(start, total):
      if stop.signum is not None:
        break
      batch = prefetch.get(step)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        sink.consume(*pending, last_good)
      pending = (step + 1, metrics)
      bar.update(config.batch_size)
      if sink.last:
        bar.set_postfix_str(f"loss {sink.last['loss']:.4f} mse {sink.last['joint/mse']:.3f}", refresh=False)
      if validator is not None and ((step + 1) % run.eval_every_steps == 0 or step + 1 == total):
        # Off the hot path: only eval steps run the sample's forward and read its results on the host.
        val = validator(state)
        if tracker is not None:
          tracker.log(step + 1, val)
      if (step + 1) % run.checkpoint_every_steps == 0 or step + 1 == total:
        sink.consume(*pending, last_good)  # never checkpoint a state we have not checked
        pending = None
        ckpt.save(step + 1, state, {"batches_consumed": step + 1})
        progress["saved"] = True
        last_good = step + 1
    if pending is not None:
      sink.consume(*pending, last_good)
      pending = None
    if stop.signum is not None:
      done = int(state.step)
      if done != last_good and done > 0:
        ckpt.save(done, state, {"batches_consumed": done})
        progress["saved"] = True
      raise Interrupted(f"interrupted at step {done}; rerun the same command to resume", stop.signum)
  finally:
    bar.close()
    prefetch.close()
  write_artifacts(state, store, run, total * config.batch_size)  # every process joins the gather
  return sink.last
