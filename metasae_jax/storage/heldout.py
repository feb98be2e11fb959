"""Held-out tokens of an activation store as float32 batches, honouring the attention-sink skip rule.

Legend: B = tokens in a batch, D = d_model.
"""

from typing import Iterator, NamedTuple, Optional

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage import positions
from metasae_jax.storage.store_types import Store


class Batch(NamedTuple):
  """One batch: activations and each token's global index in the store."""
  acts_BxD: np.ndarray
  index_B: np.ndarray


# The record lives beside the rule; evaluation and calibration reach it through here.
skip_rule = positions.skip_rule


def available_tokens(store: Store, skip_first_positions: int) -> int:
  return positions.KeptTokens(store, skip_first_positions).num_kept


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
  kept = positions.KeptTokens(store, skip_first_positions)
  total = min(num_tokens, kept.num_kept)
  for start in range(0, total, batch_size):
    index_B = kept.kept_to_global(np.arange(start, min(start + batch_size, total), dtype=np.int64))
    yield Batch(store.gather_acts(index_B), index_B)


def context_of(store: Store, index: int) -> tuple[np.ndarray, int]:
  """The token ids of the context holding global token `index`, and its position in it."""
  if not store.has_tokens:
    raise UserError(f"activation store {store.path} has no tokens; contexts need a store exported from text.")
  kept = positions.KeptTokens(store, 0)
  start, end = int(kept.context_start([index])[0]), int(kept.context_end([index])[0])
  return store.read_tokens(start, end + 1), int(index) - start
