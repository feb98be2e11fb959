"""The training loop: store → jitted step (once, donated, sharded) → checkpoints → SAE artifacts."""

import dataclasses
import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from metasae_jax.storage import artifact, atomic
from metasae_jax.training import data, sharding
from metasae_jax.training.checkpoint import Checkpointer
from metasae_jax.core.config import TrainConfig
from metasae_jax.core.errors import UserError
from metasae_jax.storage.store import open_store
from metasae_jax.core.train_step import TrainState, init_train_state, train_step

RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
# What a run directory holds; any of them without RUN_CONFIG means someone else's files.
RUN_FILES = (*artifact.SAE_NAMES, "checkpoints", METRICS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """Where the data comes from and where the run goes (everything outside the math)."""
  activations: str
  """Activation store directory (metasae-activations/1)."""
  out_dir: str
  """Run directory: joint/, solo/, joint/meta/, metrics.jsonl, checkpoints/."""
  num_tokens: int = 0
  """Training tokens (after skipping); 0 means one pass over the store's usable tokens."""
  skip_first_positions: int = 1
  """Positions skipped at the start of every context (attention sinks; docs/method.md §3.2)."""
  checkpoint_every_steps: int = 1000
  """Save an Orbax checkpoint every this many steps (and at the end)."""
  log_every_steps: int = 50
  """Write a metrics.jsonl line every this many steps (and at the end)."""
  max_checkpoints: int = 2
  """Checkpoints kept on disk."""
  progress: bool = True
  """Show a progress bar."""


def _identity(config: TrainConfig, run: RunConfig, store) -> dict:
  return {"train": config.to_dict(),
          "data": {"activations": os.path.abspath(run.activations), "store_tokens": store.num_tokens,
                   "d_model": store.d_model, "num_tokens": run.num_tokens,
                   "skip_first_positions": run.skip_first_positions}}


def _claim_out_dir(out_dir: str, identity: dict, writer: bool) -> None:
  """Refuses a run directory that holds a run with another config; never overwrites it."""
  path = os.path.join(out_dir, RUN_CONFIG)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise UserError(f"{path} is damaged. Use a new --out_dir (this one is left untouched).")
    if old != identity:
      diffs = [f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}"
               for section, fields in identity.items() for key, value in fields.items()
               if old.get(section, {}).get(key) != value]
      raise UserError(f"--out_dir {out_dir} holds a run with a different config ({'; '.join(diffs)}). "
                      "Rerun with the original flags to resume, or pick a new --out_dir.")
    return
  found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
  if found:
    raise UserError(f"--out_dir {out_dir} holds {', '.join(found)} but no {RUN_CONFIG}, so it is not a run "
                    "this command can resume. Pick a new --out_dir (nothing was changed).")
  if writer:
    atomic.write_json(path, identity)


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
  host = jax.device_get(state)
  out = run.out_dir

  def cfg(which):
    return artifact.sae_cfg(which, config.to_dict(), trained_tokens, source=store.source,
                            skip_first_positions=run.skip_first_positions, context_len=store.context_len)

  artifact.save_sae(os.path.join(out, "joint"), host.joint.params, cfg("joint"))
  artifact.save_sae(os.path.join(out, "joint", "meta"), host.meta.params, cfg("meta"))
  if host.solo is not None:
    artifact.save_sae(os.path.join(out, "solo"), host.solo.params, cfg("solo"))


class _MetricsSink:
  """Reads step metrics one step late, stops on non-finite values, logs every few steps."""

  def __init__(self, path: str, batch_size: int, log_every: int, total: int, writer: bool):
    self.path, self.batch_size, self.log_every, self.total, self.writer = (
        path, batch_size, log_every, total, writer)
    self.last: dict = {}
    self.start = time.time()

  def consume(self, step: int, metrics, last_good: Optional[int]) -> dict:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in m.items() if not math.isfinite(v))
    if bad:
      where = f"the last good checkpoint (step {last_good}) is intact" if last_good else "no checkpoint was written"
      raise UserError(f"training diverged: non-finite {', '.join(bad)} at step {step}; {where}. "
                      "Lower --lr or check the activations for outliers.")
    self.last = m
    if self.writer and (step % self.log_every == 0 or step == self.total):
      line = {"step": step, "tokens": step * self.batch_size, **m}
      with open(self.path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return m


def train_and_save(config: TrainConfig, run: RunConfig) -> dict:
  """Trains (or resumes) joint + solo SAEs and writes the artifacts. Returns the last metrics."""
  store = open_store(run.activations)
  if store.d_model != config.d_model:
    raise UserError(f"activation store {run.activations} has d_model {store.d_model} but the config says "
                    f"{config.d_model}.")
  writer = jax.process_index() == 0
  dp = sharding.DataParallel(config.batch_size)
  source = data.BatchSource(store, config.batch_size, config.seed, run.skip_first_positions,
                            jax.process_index(), jax.process_count())
  total = (run.num_tokens // config.batch_size) if run.num_tokens else source.batches_per_epoch
  if total <= 0:
    raise UserError(f"--num_tokens {run.num_tokens} is less than one batch of {config.batch_size}.")
  _claim_out_dir(run.out_dir, _identity(config, run, store), writer)

  if writer:  # temp files of atomic writes cut short by a kill (Orbax cleans its own)
    for sub in ("", *artifact.SAE_NAMES, os.path.join("joint", "meta")):
      atomic.remove_stale_temps(os.path.join(run.out_dir, sub))
  ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), run.max_checkpoints)
  state = init_train_state(config)
  last_good = ckpt.latest_step()
  if last_good is not None:
    state, cursor = ckpt.restore(state)
    if cursor.get("batches_consumed") != int(state.step):
      raise UserError(f"checkpoint {last_good} in {run.out_dir} is inconsistent (cursor {cursor}). "
                      "Delete that checkpoint directory to fall back to an earlier one.")
  start = int(state.step)
  metrics_path = os.path.join(run.out_dir, METRICS)
  if writer:
    _trim_metrics(metrics_path, start)
  state = dp.put_state(state)

  step_fn = jax.jit(train_step, in_shardings=(dp.replicated, dp.batch_sharding),
                    out_shardings=(dp.replicated, dp.replicated), donate_argnums=0)
  sink = _MetricsSink(metrics_path, config.batch_size, run.log_every_steps, total, writer)
  prefetch = data.Prefetcher(source, dp.put_batch)
  bar = tqdm(total=total * config.batch_size, initial=start * config.batch_size, unit="tok",
             unit_scale=True, desc="train", disable=not (run.progress and writer), smoothing=0.1)
  pending = None
  step = start
  try:
    for step in range(start, total):
      batch = prefetch.get(step)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        sink.consume(*pending, last_good)
      pending = (step + 1, metrics)
      bar.update(config.batch_size)
      if sink.last:
        bar.set_postfix_str(f"loss {sink.last['loss']:.4f} mse {sink.last['joint/mse']:.3f}", refresh=False)
      if (step + 1) % run.checkpoint_every_steps == 0 or step + 1 == total:
        sink.consume(*pending, last_good)  # never checkpoint a state we have not checked
        pending = None
        ckpt.save(step + 1, state, {"batches_consumed": step + 1})
        last_good = step + 1
    if pending is not None:
      sink.consume(*pending, last_good)
  finally:
    bar.close()
    prefetch.close()
    ckpt.close()
  if writer:
    write_artifacts(state, store, run, total * config.batch_size)
  return sink.last
