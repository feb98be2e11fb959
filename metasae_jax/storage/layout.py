"""Which store tokens are encoded (skipping each context's first positions) and where contexts start.

Legend: K = kept (encoded) tokens. A store's token t of shard s belongs to
context t // context_len of that shard (docs/method.md §3.1); "global" indices run over
all shards in order, "kept ranks" over the tokens that are encoded.
"""

import numpy as np

from metasae_jax.storage.store import Store


class TokenLayout:
  """Maps kept ranks <-> global token indices and gives each token's context start."""

  def __init__(self, store: Store, skip_first_positions: int):
    self.context_len = store.context_len
    # Skipping is meaningless for stores of single-token "contexts" (docs/method.md §3.2).
    self.skip = 0 if store.context_len == 1 else min(skip_first_positions, store.context_len)
    self.offsets_S1 = store.shard_offsets
    sizes = np.diff(self.offsets_S1)
    kept = np.array([self._kept_in(int(n)) for n in sizes], np.int64)
    self.kept_offsets_S1 = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)

  @property
  def num_kept(self) -> int:
    return int(self.kept_offsets_S1[-1])

  def _kept_in(self, n: int) -> int:
    length, skip = self.context_len, self.skip
    full, rest = divmod(n, length)
    return full * (length - skip) + max(0, rest - skip)

  def kept_to_global(self, ranks_K: np.ndarray) -> np.ndarray:
    """Global token index of each kept rank."""
    ranks_K = np.asarray(ranks_K, np.int64)
    shard_K = np.searchsorted(self.kept_offsets_S1, ranks_K, side="right") - 1
    local_K = ranks_K - self.kept_offsets_S1[shard_K]
    per_ctx = self.context_len - self.skip
    ctx_K, pos_K = np.divmod(local_K, per_ctx)
    return self.offsets_S1[shard_K] + ctx_K * self.context_len + pos_K + self.skip

  def global_to_kept(self, global_K: np.ndarray) -> np.ndarray:
    """Kept rank of each global index, -1 for skipped positions."""
    global_K = np.asarray(global_K, np.int64)
    shard_K = np.searchsorted(self.offsets_S1, global_K, side="right") - 1
    local_K = global_K - self.offsets_S1[shard_K]
    ctx_K, pos_K = np.divmod(local_K, self.context_len)
    per_ctx = self.context_len - self.skip
    rank_K = self.kept_offsets_S1[shard_K] + ctx_K * per_ctx + pos_K - self.skip
    return np.where(pos_K >= self.skip, rank_K, -1)

  def context_start(self, global_K: np.ndarray) -> np.ndarray:
    """Global index of the first token of each token's context."""
    global_K = np.asarray(global_K, np.int64)
    shard_K = np.searchsorted(self.offsets_S1, global_K, side="right") - 1
    local_K = global_K - self.offsets_S1[shard_K]
    return self.offsets_S1[shard_K] + (local_K // self.context_len) * self.context_len


def gather_rows(store: Store, global_K: np.ndarray, tokens: bool = False) -> np.ndarray:
  """Activations [K, D] (float32) or tokens [K] of arbitrary global indices, read shard by shard."""
  global_K = np.asarray(global_K, np.int64)
  offsets = store.shard_offsets
  shard_K = np.searchsorted(offsets, global_K, side="right") - 1
  shape = (len(global_K),) if tokens else (len(global_K), store.d_model)
  out = np.empty(shape, np.int64 if tokens else np.float32)
  for s in np.unique(shard_K):
    sel = np.nonzero(shard_K == s)[0]
    local = global_K[sel] - offsets[s]
    src = store.shards[s].tokens_T if tokens else store.shards[s].acts_TxD
    out[sel] = src[local]
  return out
