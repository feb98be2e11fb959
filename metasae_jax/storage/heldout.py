"""Held-out tokens of an activation store as float32 batches, honouring the attention-sink skip rule.

Legend: B = tokens in a batch, D = d_model, T = tokens in a shard, L = context_len.
"""

from typing import Iterator, NamedTuple, Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage.store import Store


class Batch(NamedTuple):
  """One batch: activations and each token's global index in the store."""
  acts_BxD: np.ndarray
  index_B: np.ndarray


def skip_rule(context_len: int, skip_first_positions: int) -> dict:
  """The rule as written into cfg.json / report.json."""
  active = context_len > 1 and skip_first_positions > 0
  return {"skip_first_positions": int(skip_first_positions), "context_len": int(context_len),
          "applied": bool(active),
          "rule": (f"tokens at position t % {context_len} < {skip_first_positions} are skipped"
                   if active else "no positions skipped")}


def kept_local_T(num_tokens: int, context_len: int, skip_first_positions: int) -> np.ndarray:
  """Local indices of a shard's tokens that are kept (position t % L >= s when L > 1)."""
  t = np.arange(num_tokens, dtype=np.int64)
  if context_len > 1 and skip_first_positions > 0:
    t = t[(t % context_len) >= skip_first_positions]
  return t


def available_tokens(store: Store, skip_first_positions: int) -> int:
  return int(sum(len(kept_local_T(s.num_tokens, store.context_len, skip_first_positions))
                 for s in store.shards))


def resolve_num_tokens(store: Store, num_tokens: Optional[int], skip_first_positions: int) -> int:
  """Tokens used after skipping; 0/None means all. Asking for more than the store holds is an error."""
  if skip_first_positions < 0:
    raise UserError(f"--skip_first_positions must be >= 0, got {skip_first_positions}.")
  have = available_tokens(store, skip_first_positions)
  if not num_tokens:
    return have
  if num_tokens < 0:
    raise UserError(f"--num_tokens must be positive (0 = all), got {num_tokens}.")
  if num_tokens > have:
    raise UserError(f"--num_tokens {num_tokens} exceeds the {have} tokens store {store.path} holds after "
                    f"skipping {skip_first_positions} position(s) per context; lower --num_tokens or "
                    "pass 0 to use them all.")
  return int(num_tokens)


def iter_batches(store: Store, batch_size: int, num_tokens: int,
                 skip_first_positions: int) -> Iterator[Batch]:
  """Yields batches of `batch_size` kept tokens (the last one may be smaller), in store order."""
  if batch_size <= 0:
    raise UserError(f"--batch_size must be positive, got {batch_size}.")
  offsets = store.shard_offsets
  pending_acts, pending_idx, pending = [], [], 0
  left = num_tokens
  for shard, offset in zip(store.shards, offsets[:-1]):
    if left <= 0:
      break
    local_T = kept_local_T(shard.num_tokens, store.context_len, skip_first_positions)[:left]
    left -= len(local_T)
    for start in range(0, len(local_T), batch_size):
      sel = local_T[start:start + batch_size]
      pending_acts.append(np.asarray(shard.acts_TxD[sel], np.float32))
      pending_idx.append(sel + offset)
      pending += len(sel)
      while pending >= batch_size:
        acts = np.concatenate(pending_acts)
        idx = np.concatenate(pending_idx)
        yield Batch(acts[:batch_size], idx[:batch_size])
        pending_acts, pending_idx = [acts[batch_size:]], [idx[batch_size:]]
        pending -= batch_size
  if pending:
    yield Batch(np.concatenate(pending_acts), np.concatenate(pending_idx))


def context_of(store: Store, index: int) -> tuple[np.ndarray, int]:
  """The token ids of the context holding global token `index`, and its position in it."""
  offsets = store.shard_offsets
  s = int(np.searchsorted(offsets, index, side="right") - 1)
  shard = store.shards[s]
  if shard.tokens_T is None:
    raise UserError(f"activation store {store.path} has no tokens; contexts need a store exported from text.")
  local = int(index - offsets[s])
  start = (local // store.context_len) * store.context_len
  return np.asarray(shard.tokens_T[start:start + store.context_len]), local - start
