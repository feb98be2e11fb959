"""Deterministic shuffled training batches from an activation store.

Legend: B = global batch, b = this process's slice of it, D = d_model, U = usable tokens.
The order is a pure function of (seed, batch position), so the data cursor is
just the number of batches consumed: resuming from a checkpoint replays
exactly the batches an uninterrupted run would have seen.
"""

import concurrent.futures
import dataclasses
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage.store import Store


def usable_count(num_tokens: int, context_len: int, skip_first_positions: int) -> int:
  """Tokens left after skipping the first positions of every context (none when context_len is 1)."""
  skip = skip_first_positions if context_len > 1 else 0
  per = context_len - skip
  full, rest = divmod(num_tokens, context_len)
  return full * per + max(0, rest - skip)


def usable_to_global(u: np.ndarray, context_len: int, skip_first_positions: int) -> np.ndarray:
  """Maps usable-token indices to store token indices."""
  skip = skip_first_positions if context_len > 1 else 0
  per = context_len - skip
  return (u // per) * context_len + skip + u % per


def gather_tokens(store: Store, global_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the store at sorted global token indices. Returns (acts [len, D], shard id per row)."""
  offsets = store.shard_offsets
  shard_of = np.searchsorted(offsets, global_idx, side="right") - 1
  out = np.empty((len(global_idx), store.d_model), dtype=store.dtype)
  for s in np.unique(shard_of):
    rows = shard_of == s
    out[rows] = store.shards[s].acts_TxD[global_idx[rows] - offsets[s]]
  return out, shard_of


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
    self.num_usable = usable_count(self.store.num_tokens, self.store.context_len, self.skip_first_positions)
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
    global_idx = usable_to_global(idx, self.store.context_len, self.skip_first_positions)
    acts, shard_of = gather_tokens(self.store, global_idx)
    finite = np.isfinite(acts).all(axis=1)
    if not finite.all():
      shard = self.store.shards[int(shard_of[np.argmin(finite)])].activations_path
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
