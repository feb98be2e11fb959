"""Training batches from an activation store: a seeded chunk order, a windowed shuffle buffer, reads on threads.

Legend: B = global batch, b = rows per data stream per step, S = data streams, P = processes, C = chunks,
W = chunks per window, D = d_model.
The order is a pure function of (seed, step, S, shuffle buffer, the store's chunk layout), so the data cursor is
the number of batches consumed and a resumed run replays exactly the batches an uninterrupted one sees:
  - epoch e permutes the store's chunks (seeded by (seed, e)); stream j takes every S-th chunk of that order;
  - a stream's chunks are cut into windows of W chunks (W x chunk ~ the shuffle buffer); a window's kept tokens
    (store order) are permuted, seeded by (seed, e, j, window), and streamed out in that order;
  - step i of epoch e takes rows [i*b, (i+1)*b) of each stream's epoch, stream j filling rows [j*b, (j+1)*b) of
    the global batch (rows sorted by store index within a stream's slice).
Process p owns streams [p*S/P, (p+1)*S/P) (a contiguous slice of the global batch) and reads only their chunks:
each chunk is read once per epoch, by one process. A window that holds a stream's whole epoch (S = 1 and a
buffer at least the store) is the one permutation of all kept tokens that reading used before chunks, so such
runs see the same batches as before.
"""

import concurrent.futures
import dataclasses
import threading
from typing import Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import positions
from metasae_jax.storage.store_types import Store
# Tokens each data stream shuffles within (rounded to whole chunks); a process holds up to two windows per stream.
from metasae_jax.training.run_config import DEFAULT_SHUFFLE_BUFFER

_CHUNK_ORDER_KEY, _WINDOW_KEY = 0x636B, 0x7769  # keep the chunk-order and window seeds apart


@dataclasses.dataclass
class _Plan:
  """One stream's epoch: its windows (chunk numbers, store order) and where each window starts in its rows."""
  windows: list
  row_offsets: np.ndarray


@dataclasses.dataclass
class BatchSource:
  """Shuffled batches without replacement within an epoch; epochs reshuffle from (seed, epoch)."""
  store: Store
  batch_size: int
  seed: int
  skip_first_positions: int = 0
  process_index: int = 0
  process_count: int = 1
  shuffle_buffer_tokens: int = DEFAULT_SHUFFLE_BUFFER
  """Tokens a data stream shuffles within (whole chunks, at least one)."""
  streams: int = 0
  """Data streams the global batch is split into (0 = one per process); the order depends on it, not on P."""
  read_threads: int = 4
  """Threads reading chunks ahead of the step."""

  def __post_init__(self):
    c = self.store.context_len
    if self.skip_first_positions < 0 or (c > 1 and self.skip_first_positions >= c):
      raise UserError(f"--skip_first_positions {self.skip_first_positions} must be in [0, context_len={c}).")
    self.kept = positions.KeptTokens(self.store, self.skip_first_positions)
    self.num_usable = self.kept.num_kept
    self.num_streams = self.streams or self.process_count
    if self.num_streams % self.process_count:
      raise UserError(f"the run reads {self.num_streams} data streams, not a multiple of the {self.process_count} "
                      "processes. Resume it with a number of processes that divides it.")
    if self.batch_size % self.num_streams:
      raise UserError(f"--batch_size {self.batch_size} is not divisible by the number of data streams "
                      f"{self.num_streams} (one per process unless the run recorded another). Pick a multiple of it.")
    if self.shuffle_buffer_tokens <= 0:
      raise UserError(f"--shuffle_buffer_tokens must be positive, got {self.shuffle_buffer_tokens}.")
    lengths_C = np.diff(self.store.chunk_offsets)
    skip = positions.effective_skip(c, self.skip_first_positions)
    self._skip = skip
    self.kept_C = np.array([positions.kept_count(int(n), c, skip) for n in lengths_C], np.int64)
    num_chunks = len(lengths_C)
    self.rows = self.batch_size // self.num_streams
    if num_chunks < self.num_streams:
      raise UserError(f"activation store {self.store.path} has {num_chunks} chunks, fewer than the "
                      f"{self.num_streams} data streams. Export more tokens or use fewer processes.")
    # Rows every stream has in every epoch, whichever chunks the epoch's order gives it.
    min_rows = int(np.sort(self.kept_C)[:num_chunks // self.num_streams].sum())
    self.batches_per_epoch = min_rows // self.rows
    if self.batches_per_epoch == 0:
      raise UserError(f"activation store {self.store.path} has {self.num_usable} usable tokens, fewer than "
                      f"one batch of {self.batch_size}" + (f" per {self.num_streams} data streams"
                                                           if self.num_streams > 1 else "")
                      + ". Export more tokens or lower --batch_size.")
    self.window_chunks = max(1, self.shuffle_buffer_tokens // max(1, int(lengths_C.max())))
    per = self.num_streams // self.process_count
    self.my_streams = range(self.process_index * per, (self.process_index + 1) * per)
    self._plans: dict = {}
    self._perms: dict = {}
    self._loaded: dict = {}
    self._lock = threading.Lock()
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

  def _plan(self, epoch: int, stream: int) -> _Plan:
    key = (epoch, stream)
    if key not in self._plans:
      order = np.random.default_rng([self.seed, epoch, _CHUNK_ORDER_KEY]).permutation(len(self.kept_C))
      mine = order[stream::self.num_streams]
      windows = [np.sort(mine[k:k + self.window_chunks]) for k in range(0, len(mine), self.window_chunks)]
      sizes = [int(self.kept_C[w].sum()) for w in windows]
      _bounded(self._plans, 4 * self.num_streams)
      self._plans[key] = _Plan(windows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    return self._plans[key]

  def _permutation(self, epoch: int, stream: int, window: int, n: int) -> np.ndarray:
    key = (epoch, stream, window)
    if key not in self._perms:
      whole = self.num_streams == 1 and len(self._plan(epoch, stream).windows) == 1
      seed = [self.seed, epoch] if whole else [self.seed, epoch, _WINDOW_KEY, stream, window]
      dtype = np.int32 if n < 2**31 else np.int64
      _bounded(self._perms, 4 * self.num_streams)
      self._perms[key] = np.random.default_rng(seed).permutation(n).astype(dtype)
    return self._perms[key]

  def _stream_rows(self, position: int, stream: int) -> list:
    """[(window, window-local row ranks)] of one stream's slice of batch `position`."""
    epoch, i = divmod(position, self.batches_per_epoch)
    plan = self._plan(epoch, stream)
    lo, hi = i * self.rows, (i + 1) * self.rows
    out = []
    for w in range(int(np.searchsorted(plan.row_offsets, lo, side="right") - 1), len(plan.windows)):
      a, z = int(plan.row_offsets[w]), int(plan.row_offsets[w + 1])
      if a >= hi:
        break
      perm = self._permutation(epoch, stream, w, z - a)
      out.append((w, perm[max(lo, a) - a:min(hi, z) - a].astype(np.int64)))
    return out

  def _to_chunk_rows(self, chunks: np.ndarray, ranks: np.ndarray) -> tuple:
    """Window-local kept ranks → (chunk number, token index inside the chunk)."""
    offsets = np.concatenate([[0], np.cumsum(self.kept_C[chunks])])
    which = np.searchsorted(offsets, ranks, side="right") - 1
    local = ranks - offsets[which]
    per_ctx = self.store.context_len - self._skip
    ctx, pos = np.divmod(local, per_ctx)
    return chunks[which], ctx * self.store.context_len + pos + self._skip

  def windows_of(self, epoch: int) -> list:
    """This process's windows of `epoch` (arrays of chunk numbers), in the order they are read."""
    return [w for j in self.my_streams for w in self._plan(epoch, j).windows]

  def global_indices(self, position: int) -> np.ndarray:
    """Store indices of this process's rows of batch `position`, in the order `batch` returns them."""
    return np.concatenate([self._slice(position, j)[2] for j in self.my_streams])

  def _slice(self, position: int, stream: int) -> tuple:
    epoch = position // self.batches_per_epoch
    plan = self._plan(epoch, stream)
    chunk_parts, row_parts, windows = [], [], []
    for w, ranks in self._stream_rows(position, stream):
      c, r = self._to_chunk_rows(plan.windows[w], ranks)
      chunk_parts.append(c)
      row_parts.append(r)
      windows.append(w)
    chunk_K, row_K = np.concatenate(chunk_parts), np.concatenate(row_parts)
    global_K = self.store.chunk_offsets[chunk_K] + row_K
    order = np.argsort(global_K, kind="stable")
    return (epoch, windows), (chunk_K[order], row_K[order]), global_K[order]

  def batch(self, position: int) -> np.ndarray:
    """This process's rows of global batch number `position` (store dtype; cast on device)."""
    parts = []
    for stream in self.my_streams:
      (epoch, windows), (chunk_K, row_K), global_K = self._slice(position, stream)
      data = self._windows(epoch, stream, windows)
      acts = np.empty((len(row_K), self.store.d_model), self.store.dtype)
      bounds = np.flatnonzero(np.diff(chunk_K)) + 1
      for sel in np.split(np.arange(len(chunk_K)), bounds):
        acts[sel] = data[int(chunk_K[sel[0]])].result()[row_K[sel]]
      finite = np.isfinite(acts).all(axis=1)
      if not finite.all():
        raise UserError(f"non-finite activations (NaN/Inf) in the batch of step {position + 1} (batch {position}, "
                        f"0-based) from {self.store.describe(int(global_K[np.argmin(finite)]))}. Re-export that "
                        "part of the store or remove it from the store.")
      parts.append(acts)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def _windows(self, epoch: int, stream: int, windows: list) -> dict:
    """Chunk futures of the windows a slice needs; drops older windows, starts reading the next one."""
    plan = self._plan(epoch, stream)
    need = [(epoch, stream, w) for w in windows]
    with self._lock:
      for key in need:
        self._submit(key, plan.windows[key[2]])
      first = need[0]
      for key in [k for k in self._loaded if k[1] == stream and (k[0], k[2]) < (first[0], first[2])]:
        for fut in self._loaded.pop(key).values():
          fut.cancel()
      last = need[-1]
      nxt = (epoch, stream, last[2] + 1) if last[2] + 1 < len(plan.windows) else (epoch + 1, stream, 0)
      self._submit(nxt, self._plan(nxt[0], stream).windows[nxt[2]])
      out = {}
      for key in need:
        out.update(self._loaded[key])
    return out

  def _submit(self, key: tuple, chunks: np.ndarray) -> None:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.read_threads)
    if key not in self._loaded:
      self._loaded[key] = {int(c): self._pool.submit(self.store.read_chunk, int(c)) for c in chunks}

  def close(self) -> None:
    with self._lock:
      for futs in self._loaded.values():
        for fut in futs.values():
          fut.cancel()
      self._loaded.clear()
      pool, self._pool = self._pool, None
    if pool is not None:
      pool.shutdown(wait=True)


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
    self._source.close()


def _bounded(cache: dict, size: int) -> None:
  """Drops the oldest entries so one more fits in `size` (entries are only ever needed near the current step)."""
  while len(cache) >= size:
    cache.pop(next(iter(cache)))
