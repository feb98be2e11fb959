"""Exports residual-stream activations of a causal LM over a corpus into a `metasae-activations/1` store.

Legend: B = contexts per forward batch, C = context length, D = d_model,
S = contexts in a shard, T = tokens (S * C).
Contexts are deterministic, so an interrupted export resumes by skipping the
contexts the manifest already holds; each shard is computed from batches that
start at the shard's first context, so a resumed store equals an uninterrupted one.
"""

import concurrent.futures
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional

import numpy as np
import torch
import tqdm
from absl import logging

from metasae_jax.storage import atomic, lock
from metasae_jax.lm import corpus as corpus_lib
from metasae_jax.lm import models
from metasae_jax.storage import store as store_lib
from metasae_jax.core.errors import UserError
# Defined without a torch import (the exporter binary checks its flags before importing this module).
from metasae_jax.lm.export_config import ExportConfig  # noqa: F401

# Extra manifest key set once the corpus had no more whole contexts: reruns are then no-ops.
EXHAUSTED = "corpus_exhausted"


def _check_existing(config: ExportConfig) -> Optional[dict]:
  """The manifest of a resumable store at out_dir, None for a fresh directory; refuses anything else."""
  path = config.out_dir
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--out_dir {path} is a file. Pass a new or empty directory.")
  if not os.path.isfile(os.path.join(path, store_lib.MANIFEST)):
    if os.path.isdir(path) and [n for n in os.listdir(path) if not atomic.is_temp(n) and n != lock.LOCK_FILE]:
      raise UserError(f"--out_dir {path} is not empty and holds no activation store. Pass a new "
                      "or empty directory (nothing was written).")
    return None
  m = store_lib.read_manifest(path)
  want = {"dtype": config.dtype, "context_len": config.context_len, "source": config.source()}
  diffs = [f"{k}: store has {m.get(k)!r}, asked {v!r}" for k, v in want.items() if k != "source"
           and m.get(k) != v]
  have_src = m.get("source", {})
  diffs += [f"source.{k}: store has {have_src.get(k)!r}, asked {v!r}"
            for k, v in want["source"].items() if have_src.get(k) != v]
  if diffs:
    raise UserError(f"activation store {path} was made with other settings ({'; '.join(diffs)}). "
                    "Rerun with the store's settings to resume it, or pass a new --out_dir "
                    "(the existing store was left unchanged).")
  if m["num_tokens"] % config.context_len:
    raise UserError(f"activation store {path} holds {m['num_tokens']} tokens, not whole contexts "
                    f"of {config.context_len}, so it cannot be resumed. Pass a new --out_dir.")
  return m


def _shard_contexts(ctx_iter: Iterator[np.ndarray], n: int) -> Optional[np.ndarray]:
  got = list(itertools.islice(ctx_iter, n))
  return np.stack(got) if got else None


def _forward_shard(loaded: models.LoadedModel, config: ExportConfig, tokens_SxC: np.ndarray,
                   bar: tqdm.tqdm) -> np.ndarray:
  """Activations [S*C, D] of one shard, written straight into a buffer of the stored dtype."""
  s, c = tokens_SxC.shape
  acts_TxD = np.empty((s * c, loaded.d_model), dtype=config.dtype)
  acts_SxCxD = torch.from_numpy(acts_TxD).view(s, c, loaded.d_model)
  ids_SxC = torch.from_numpy(tokens_SxC.astype(np.int64))
  with torch.inference_mode():
    for b in range(0, s, config.batch_size):
      h_BxCxD = models.capture_residual(loaded.model, ids_SxC[b:b + config.batch_size],
                                        config.layer, config.site)
      # One copy per batch: model dtype -> stored dtype, directly into the shard buffer.
      acts_SxCxD[b:b + config.batch_size].copy_(h_BxCxD)
      bar.update(h_BxCxD.shape[0] * c)
  return acts_TxD


def forward_only(loaded: models.LoadedModel, tokens_NxC: np.ndarray, batch_size: int, layer: int,
                 site: str) -> None:
  """The exporter's truncated forward over `tokens_NxC` with nothing kept (the export's speed limit)."""
  ids_NxC = torch.from_numpy(tokens_NxC.astype(np.int64))
  with torch.inference_mode():
    for b in range(0, len(ids_NxC), batch_size):
      models.capture_residual(loaded.model, ids_NxC[b:b + batch_size], layer, site)


def _holds_tokens(path: str) -> bool:
  try:
    with open(os.path.join(path, store_lib.MANIFEST)) as f:
      return bool(json.load(f).get("shards"))
  except (OSError, ValueError, AttributeError):
    return False


def _remove_new_store(path: str, fresh_dir: bool, dir_lock: lock.DirLock) -> None:
  """Undoes a new store that never got a shard (bad corpus, empty corpus, a failure before real work)."""
  if fresh_dir:
    shutil.rmtree(path, ignore_errors=True)
    return
  for name in [store_lib.MANIFEST] + [n for n in os.listdir(path) if atomic.is_temp(n)]:
    try:
      os.remove(os.path.join(path, name))
    except FileNotFoundError:
      pass
  dir_lock.release(remove_file=True)


def export_activations(config: ExportConfig,
                       loaded: Optional[models.LoadedModel] = None) -> store_lib.Store:
  """Writes (or resumes, or leaves as is) the activation store at `config.out_dir`.

  One exporter per store (a directory lock); a new store that fails before its first shard, or whose
  corpus yields no context, is removed again, so no finished-looking empty store is left behind.
  """
  atomic.check_output_dir(config.out_dir, "--out_dir")
  fresh_dir = not os.path.exists(config.out_dir)
  dir_lock = lock.DirLock(config.out_dir, "activation store").acquire()
  new_store = False
  try:
    manifest = _check_existing(config)
    new_store = manifest is None
    return _export_locked(config, loaded, manifest)
  except BaseException:
    if new_store and not _holds_tokens(config.out_dir):
      _remove_new_store(config.out_dir, fresh_dir, dir_lock)
    else:  # a refused or resumed store keeps everything; only a lock file this call created goes
      dir_lock.release(remove_file=True)
    raise
  finally:
    dir_lock.release()


def _export_locked(config: ExportConfig, loaded: Optional[models.LoadedModel],
                   manifest: Optional[dict]) -> store_lib.Store:
  atomic.remove_stale_temps(config.out_dir)  # shards or manifests cut short by a kill
  target = config.target_tokens
  if manifest is not None and (manifest["num_tokens"] >= target or manifest.get(EXHAUSTED)):
    logging.info("%s already holds %d tokens (asked %d%s); nothing to do.", config.out_dir,
                 manifest["num_tokens"], target,
                 ", the whole corpus" if manifest.get(EXHAUSTED) else "")
    return _with_split(config, store_lib.open_store(config.out_dir))
  ctx_source = corpus_lib.pieces(config.corpus, config.text_field)  # fails early on a bad corpus
  if loaded is None:
    loaded = models.load_model(config.model)
  models.check_site(config.layer, config.site, loaded.num_layers)
  if manifest is None:
    os.makedirs(config.out_dir, exist_ok=True)
    manifest = store_lib.new_manifest(loaded.d_model, config.dtype, config.context_len,
                                      config.source())
    store_lib.write_manifest(config.out_dir, manifest)
  elif manifest["d_model"] != loaded.d_model:
    raise UserError(f"activation store {config.out_dir} has d_model {manifest['d_model']} but "
                    f"--model {config.model} has {loaded.d_model}. Pass a new --out_dir.")
  manifest = store_lib.open_store(config.out_dir).manifest  # validates the shards already there
  done = manifest["num_tokens"]
  ctx_iter = itertools.islice(
      corpus_lib.pack(ctx_source, loaded.tokenizer, config.context_len),
      done // config.context_len, None)

  bar = tqdm.tqdm(total=target, initial=done, unit="tok", unit_scale=True, desc="export",
                  disable=not config.progress, smoothing=0.1)
  # One writer thread: shard i is fsynced while shard i+1 is computed; at most two shards in
  # memory. Leaving the `with` (also on Ctrl-C) waits for the pending shard, which then counts.
  with bar, concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
    pending, exhausted = None, False
    while done < target:
      tokens_SxC = _shard_contexts(ctx_iter, min(config.contexts_per_shard,
                                                 (target - done) // config.context_len))
      if tokens_SxC is None:
        exhausted = True
        break
      acts_TxD = _forward_shard(loaded, config, tokens_SxC, bar)
      if pending is not None:
        manifest = pending.result()
      pending = writer.submit(store_lib.append_shard, config.out_dir, manifest, acts_TxD,
                              tokens_SxC.reshape(-1))
      done += acts_TxD.shape[0]
    if pending is not None:
      manifest = pending.result()
  if exhausted:
    logging.warning("corpus %s ran out after %d tokens (asked %d).", config.corpus, done, target)
    store_lib.write_manifest(config.out_dir, dict(manifest, **{EXHAUSTED: True}))
  store = store_lib.open_store(config.out_dir)
  if store.num_tokens == 0:
    raise UserError(f"--corpus {config.corpus} has fewer than --context_len {config.context_len} "
                    "tokens: no context was exported. Use a bigger corpus or a shorter context.")
  return _with_split(config, store)


def _with_split(config: ExportConfig, store: store_lib.Store) -> store_lib.Store:
  """Writes the train / held-out views (a fixed tail of whole contexts) when the config asks for a split."""
  if config.heldout_fraction > 0:
    train_dir, held_dir = store_lib.write_split(store, config.heldout_fraction)
    logging.info("split: %s (training) and %s (held out, %g of the contexts)", train_dir, held_dir,
                 config.heldout_fraction)
  return store
