"""Deterministic shuffled training batches from an activation store.

Legend: B = global batch, b = this process's slice of it, D = d_model.
The order is a pure function of (seed, batch position), so the data cursor is
just the number of batches consumed: resuming from a checkpoint replays
exactly the batches an uninterrupted run would have seen.
"""

import concurrent.futures
import dataclasses
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import positions
from metasae_jax.storage import store as store_lib
from metasae_jax.storage.store import Store


@dataclasses.dataclass
class BatchSource:
  """Shuffled batches without replacement within an epoch; epochs reshuffle from (seed, epoch)."""
  store: Store
  batch_size: int
  seed: int
  skip_first_positions: int = 1
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.skip_first_positions < 0 or (self.store.context_len > 1
                                         and self.skip_first_positions >= self.store.context_len):
      raise UserError(f"--skip_first_positions {self.skip_first_positions} must be in "
                      f"[0, context_len={self.store.context_len}).")
    self.kept = positions.KeptTokens(self.store, self.skip_first_positions)
    self.num_usable = self.kept.num_kept
    if self.batch_size % self.process_count:
      raise UserError(f"--batch_size {self.batch_size} is not divisible by the number of processes "
                      f"{self.process_count}. Pick a multiple of it.")
    self.batches_per_epoch = self.num_usable // self.batch_size
    if self.batches_per_epoch == 0:
      raise UserError(f"activation store {self.store.path} has {self.num_usable} usable tokens, fewer than "
                      f"one batch of {self.batch_size}. Export more tokens or lower --batch_size.")
    self._perm_epoch: Optional[int] = None
    self._perm: Optional[np.ndarray] = None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      dtype = np.int32 if self.num_usable < 2**31 else np.int64
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_usable).astype(dtype)
      self._perm_epoch = epoch
    return self._perm

  def batch(self, position: int) -> np.ndarray:
    """This process's rows of global batch number `position` (store dtype; cast on device)."""
    epoch, i = divmod(position, self.batches_per_epoch)
    idx = self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    local = self.batch_size // self.process_count
    idx = np.sort(idx[self.process_index * local:(self.process_index + 1) * local].astype(np.int64))
    global_idx = self.kept.kept_to_global(idx)
    acts = store_lib.gather_acts(self.store, global_idx, dtype=None)
    finite = np.isfinite(acts).all(axis=1)
    if not finite.all():
      bad = store_lib.shard_of(self.store, global_idx[np.argmin(finite)])
      shard = self.store.shards[int(bad)].activations_path
      raise UserError(f"non-finite activations (NaN/Inf) in the batch of step {position + 1} (batch "
                      f"{position}, 0-based) from shard {shard}. Re-export that shard or remove it from "
                      "the store.")
    return acts


class Prefetcher:
  """Reads the next batch on a background thread while the device runs the current step."""

  def __init__(self, source: BatchSource, put):
    self._source, self._put = source, put
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending: dict[int, concurrent.futures.Future] = {}

  def _load(self, position: int):
    return self._put(self._source.batch(position))

  def get(self, position: int):
    """The batch at `position` (on device), and starts loading `position + 1`."""
    fut = self._pending.pop(position, None)
    value = fut.result() if fut is not None else self._load(position)
    for stale in list(self._pending):
      self._pending.pop(stale).cancel()
    self._pending[position + 1] = self._pool.submit(self._load, position + 1)
    return value

  def close(self):
    for fut in self._pending.values():
      fut.cancel()
    self._pool.shutdown(wait=True)
