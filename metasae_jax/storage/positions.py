"""Which store tokens are used: the first positions of every context are skipped (attention sinks).

Legend: S = shards, K = tokens, L = context_len.
Token t of a segment sits at position t % L of that segment's context t // L (the store format,
docs/method.md §3.1): contexts never span segments (a format-1 shard is one), so the rule is applied per segment. "Global" indices run
over all shards in order; "kept ranks" number the tokens that are not skipped, in store order.
This is the one implementation of the rule: training batches, held-out evaluation, calibration,
autointerp and the browser all go through `KeptTokens`.
"""

import numpy as np

from metasae_jax.storage.store_types import Store

# Positions training leaves out of every context unless told otherwise: none, as the paper's code (the run
# records its rule; evaluation takes the run's). RunConfig's and EvalConfig's default.
DEFAULT_SKIP_FIRST_POSITIONS = 0


def effective_skip(context_len: int, skip_first_positions: int) -> int:
  """Positions skipped per context: none for single-token "contexts", never more than the context."""
  if context_len <= 1:
    return 0
  return max(0, min(int(skip_first_positions), int(context_len)))


def kept_count(num_tokens: int, context_len: int, skip_first_positions: int) -> int:
  """Tokens of one shard of `num_tokens` that are kept (a trailing partial context counts too)."""
  skip = effective_skip(context_len, skip_first_positions)
  full, rest = divmod(int(num_tokens), context_len)
  return full * (context_len - skip) + max(0, rest - skip)


class KeptTokens:
  """Maps kept ranks <-> global token indices of a store and gives each token's context start."""

  def __init__(self, store: Store, skip_first_positions: int):
    self.context_len = store.context_len
    self.skip = effective_skip(store.context_len, skip_first_positions)
    self.offsets_S1 = store.segment_offsets
    kept_S = [kept_count(int(n), self.context_len, self.skip) for n in np.diff(self.offsets_S1)]
    self.kept_offsets_S1 = np.concatenate([[0], np.cumsum(kept_S, dtype=np.int64)]).astype(np.int64)

  @property
  def num_kept(self) -> int:
    return int(self.kept_offsets_S1[-1])

  def kept_to_global(self, ranks_K: np.ndarray) -> np.ndarray:
    """Global token index of each kept rank."""
    ranks_K = np.asarray(ranks_K, np.int64)
    shard_K = np.searchsorted(self.kept_offsets_S1, ranks_K, side="right") - 1
    local_K = ranks_K - self.kept_offsets_S1[shard_K]
    ctx_K, pos_K = np.divmod(local_K, self.context_len - self.skip)
    return self.offsets_S1[shard_K] + ctx_K * self.context_len + pos_K + self.skip

  def global_to_kept(self, global_K: np.ndarray) -> np.ndarray:
    """Kept rank of each global index, -1 for skipped positions."""
    global_K = np.asarray(global_K, np.int64)
    shard_K = np.searchsorted(self.offsets_S1, global_K, side="right") - 1
    local_K = global_K - self.offsets_S1[shard_K]
    ctx_K, pos_K = np.divmod(local_K, self.context_len)
    rank_K = self.kept_offsets_S1[shard_K] + ctx_K * (self.context_len - self.skip) + pos_K - self.skip
    return np.where(pos_K >= self.skip, rank_K, -1)

  def context_start(self, global_K: np.ndarray) -> np.ndarray:
    """Global index of the first token of each token's context."""
    global_K = np.asarray(global_K, np.int64)
    shard_K = np.searchsorted(self.offsets_S1, global_K, side="right") - 1
    local_K = global_K - self.offsets_S1[shard_K]
    return self.offsets_S1[shard_K] + (local_K // self.context_len) * self.context_len

  def context_end(self, global_K: np.ndarray) -> np.ndarray:
    """Global index of the last token of each token's context (a shard's last context may be short)."""
    global_K = np.asarray(global_K, np.int64)
    shard_end_K = self.offsets_S1[np.searchsorted(self.offsets_S1, global_K, side="right")] - 1
    return np.minimum(self.context_start(global_K) + self.context_len - 1, shard_end_K)


def skip_rule(context_len: int, skip_first_positions: int) -> dict:
  """The rule as written into cfg.json / report.json."""
  skip = effective_skip(context_len, skip_first_positions)
  return {"skip_first_positions": int(skip_first_positions), "context_len": int(context_len),
          "applied": skip > 0,
          "rule": (f"tokens at position t % {context_len} < {skip} are skipped"
                   if skip else "no positions skipped")}
