"""Turning store token ids back into text pieces with the tokenizer of the model the store came from.

Where a store's tokens meet a tokenizer or a model, `check_ids` checks every id against its vocabulary
first: a store from another tokenizer, or a damaged token shard, is one error, not a tokenizer traceback.
"""

from typing import Optional, Sequence

import numpy as np

from metasae_jax.core.errors import UserError
from metasae_jax.storage.store_types import Store

# Token ids read per chunk while checking a store (4 bytes each).
_CHECK_CHUNK = 1 << 22


def check_ids(store: Store, vocab_size: int, vocab_of: str) -> None:
  """Every token id of `store` is in [0, vocab_size), the vocabulary of `vocab_of` (a tokenizer or model)."""
  if not store.has_tokens:
    return
  for start in range(0, store.num_tokens, _CHECK_CHUNK):
    ids_K = store.read_tokens(start, min(start + _CHECK_CHUNK, store.num_tokens))
    bad_K = (ids_K < 0) | (ids_K >= vocab_size)
    if bad_K.any():
      first = int(np.argmax(bad_K))
      where = start + first
      raise UserError(
          f"activation store {store.path}: token {where} ({store.describe(where)}) has id {int(ids_K[first])}, outside the {vocab_size}-token vocabulary of {vocab_of} "
          f"({int(bad_K.sum())} such ids in these {len(ids_K)} tokens). The store was exported with another "
          "tokenizer, or its token shard is damaged: pass --tokenizer/--model naming the model it was exported "
          "from, or re-export the store.")


class Detokenizer:
  """Decodes single token ids to their text pieces (memoised)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._memo: dict = {}

  def piece(self, token_id: int) -> str:
    if token_id not in self._memo:
      self._memo[token_id] = self.tokenizer.decode([int(token_id)])
    return self._memo[token_id]

  def pieces(self, token_ids: Sequence[int]) -> list:
    return [self.piece(t) for t in token_ids]

  @classmethod
  def for_store(cls, store: Store, name: Optional[str], backend=None) -> "Detokenizer":
    """`for_source`, with every token id of `store` checked against the tokenizer's vocabulary."""
    detok = cls.for_source(name, backend)
    check_ids(store, len(detok.tokenizer), f"the tokenizer of {name}")
    return detok

  @classmethod
  def for_source(cls, name: Optional[str], backend=None) -> "Detokenizer":
    """The tokenizer of `name` (the store's source model by default); reuses a loaded local LLM's if it is the same model."""
    if not name:
      raise UserError("the activation store's manifest names no source model, so its tokens cannot be "
                      "decoded. Pass --tokenizer (an HF id or a local model directory).")
    lm = getattr(backend, "_lm", None)
    if lm is not None and getattr(lm, "name", None) == name:
      return cls(lm.tokenizer)
    from metasae_jax.lm import models  # pylint: disable=g-import-not-at-top  (torch only when decoding)
    return cls(models.load_tokenizer(name))
