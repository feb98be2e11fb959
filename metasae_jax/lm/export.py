"""Exports residual-stream activations of a causal LM over a corpus into an activation store (zarr, format 2).

Legend: B = contexts per forward batch, C = context length, D = d_model,
S = contexts in a chunk, T = tokens (S * C).
Contexts are deterministic, so an interrupted export resumes by skipping the contexts the manifest already
counts; each chunk is computed from batches that start at the chunk's first context, so a resumed store equals
an uninterrupted one, on local disk and on object storage alike. A format-1 store being resumed keeps its format.
"""

import concurrent.futures
import itertools
import os
import shutil
from typing import Iterator, Optional

import numpy as np
import torch
import tqdm
from absl import logging

from metasae_jax.storage import atomic, lease, location, lock, npy_store, zarr_store
from metasae_jax.lm import corpus as corpus_lib
from metasae_jax.lm import models
from metasae_jax.storage import store as store_lib
from metasae_jax.core.errors import UserError
# Defined without a torch import (the exporter binary checks its flags before importing this module).
from metasae_jax.lm.export_config import ExportConfig  # noqa: F401

# Extra manifest key set once the corpus had no more whole contexts: reruns are then no-ops.
EXHAUSTED = "corpus_exhausted"


def _check_existing(config: ExportConfig) -> Optional[dict]:
  """The manifest of a resumable store at out_dir, None for a fresh location; refuses anything else."""
  path = config.out_dir
  if not location.is_remote(path) and os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--out_dir {path} is a file. Pass a new or empty directory.")
  if not store_lib.exists(path):
    if _other_content(path):
      raise UserError(f"--out_dir {path} is not empty and holds no activation store. Pass a new "
                      "or empty directory (nothing was written).")
    return None
  m = store_lib.read_manifest(path)
  if "view_of" in m:
    raise UserError(f"--out_dir {path} is a view of another store; export into the store itself or a new location.")
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


def _other_content(path: str) -> bool:
  """Anything at `path` besides a lock, a lease or a killed writer's temp files."""
  own = (lock.LOCK_FILE, lease.LEASE_FILE)
  if not location.is_remote(path):
    return os.path.isdir(path) and any(not atomic.is_temp(n) and n not in own for n in os.listdir(path))
  where = location.parse(path)
  if where.scheme == "gs":  # known keys only: gcp-storage-emulator ignores a listing's startOffset/endOffset,
    # and TensorStore aborts on the keys outside the range it gets back
    return any(location.exists(where, k) for k in (npy_store.MANIFEST, f"{zarr_store.ACTS}/{zarr_store.GROUP}"))
  keys = location.open_kvstore(where).list().result()
  return any(k.decode() not in own for k in keys)


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
    return store_lib.read_manifest(path)["num_tokens"] > 0
  except UserError:
    return False


def _remove_new_store(path: str, fresh_dir: bool, dir_lock) -> None:
  """Undoes a new store that never got a chunk (bad corpus, empty corpus, a failure before real work)."""
  if location.is_remote(path):  # known keys only: a store that never counted a chunk has at most chunk 0 written
    where = location.parse(path)
    for key in (zarr_store.GROUP, f"{zarr_store.ACTS}/{zarr_store.GROUP}", f"{zarr_store.TOKENS}/{zarr_store.GROUP}"):
      location.delete(where, key)
    zarr_store.drop_chunk_objects(path, 0, has_tokens=True)
    dir_lock.release()
    return
  if fresh_dir:
    shutil.rmtree(path, ignore_errors=True)
    return
  for name in os.listdir(path):
    full = os.path.join(path, name)
    if name in (zarr_store.GROUP, npy_store.MANIFEST, zarr_store.ACTS, zarr_store.TOKENS, zarr_store.CHECKSUMS,
                store_lib.TRAIN_VIEW, store_lib.HELDOUT_VIEW) or atomic.is_temp(name):
      shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
  dir_lock.release(remove_file=True)


class _NpyWriter:
  """Appends shards to a format-1 store being resumed (exports started before format 2)."""

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest

  @property
  def num_tokens(self) -> int:
    return self.manifest["num_tokens"]

  def append(self, acts_TxD, tokens_T) -> None:
    self.manifest = npy_store.append_shard(self.path, self.manifest, acts_TxD, tokens_T)

  def finish(self, **extra) -> None:
    if extra:
      self.manifest = dict(self.manifest, **extra)
      npy_store.write_manifest(self.path, self.manifest)


def export_activations(config: ExportConfig,
                       loaded: Optional[models.LoadedModel] = None) -> store_lib.Store:
  """Writes (or resumes, or leaves as is) the activation store at `config.out_dir` (a directory, s3:// or gs://).

  One exporter per store (a directory lock, a lease object on object storage); a new store that fails before
  its first chunk, or whose corpus yields no context, is removed again, so no finished-looking empty store is
  left behind.
  """
  remote = location.is_remote(config.out_dir)
  if not remote:
    atomic.check_output_dir(config.out_dir, "--out_dir")
  fresh_dir = not remote and not os.path.exists(config.out_dir)
  dir_lock = lock.writer_lock(config.out_dir, "activation store").acquire()
  new_store = False
  try:
    manifest = _check_existing(config)
    new_store = manifest is None
    return _export_locked(config, loaded, manifest, dir_lock)
  except BaseException:
    if new_store and not _holds_tokens(config.out_dir):
      _remove_new_store(config.out_dir, fresh_dir, dir_lock)
    else:  # a refused or resumed store keeps everything; only a lock file this call created goes
      dir_lock.release(remove_file=True)
    raise
  finally:
    dir_lock.release()


def _export_locked(config: ExportConfig, loaded: Optional[models.LoadedModel],
                   manifest: Optional[dict], dir_lock) -> store_lib.Store:
  if not location.is_remote(config.out_dir):
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
  if manifest is not None and manifest["d_model"] != loaded.d_model:
    raise UserError(f"activation store {config.out_dir} has d_model {manifest['d_model']} but "
                    f"--model {config.model} has {loaded.d_model}. Pass a new --out_dir.")
  if manifest is None:
    writer = zarr_store.Writer.create(config.out_dir, loaded.d_model, config.dtype, config.context_len,
                                      config.chunk_tokens, config.source(), has_tokens=True, capacity=target)
  elif manifest["format"] == store_lib.FORMAT_NPY:
    store_lib.open_store(config.out_dir)  # validates the shards already there
    writer = _NpyWriter(config.out_dir, manifest)
  else:
    store_lib.open_store(config.out_dir)  # validates the chunks' metadata and checksum list
    writer = zarr_store.Writer(config.out_dir, manifest)
    writer.drop_short_chunk()  # a finished store's short last chunk is recomputed whole when it grows
    writer.drop_uncounted()
  unit = (config.contexts_per_shard if isinstance(writer, _NpyWriter)
          else writer.attrs["chunk_tokens"] // config.context_len)
  done = writer.num_tokens
  ctx_iter = itertools.islice(
      corpus_lib.pack(ctx_source, loaded.tokenizer, config.context_len),
      done // config.context_len, None)

  bar = tqdm.tqdm(total=target, initial=done, unit="tok", unit_scale=True, desc="export",
                  disable=not config.progress, smoothing=0.1)
  # One writer thread: chunk i is written while chunk i+1 is computed; at most two in memory. Leaving the
  # `with` (also on Ctrl-C) waits for the pending chunk, which then counts.
  with bar, concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending, exhausted = None, False
    while done < target:
      dir_lock.check()
      tokens_SxC = _shard_contexts(ctx_iter, min(unit, (target - done) // config.context_len))
      if tokens_SxC is None:
        exhausted = True
        break
      acts_TxD = _forward_shard(loaded, config, tokens_SxC, bar)
      if pending is not None:
        pending.result()
      pending = pool.submit(writer.append, acts_TxD, tokens_SxC.reshape(-1))
      done += acts_TxD.shape[0]
    if pending is not None:
      pending.result()
  writer.finish(**({EXHAUSTED: True} if exhausted else {}))
  if exhausted:
    logging.warning("corpus %s ran out after %d tokens (asked %d).", config.corpus, done, target)
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
