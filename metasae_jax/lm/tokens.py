"""Turning store token ids back into text pieces with the tokenizer of the model the store came from."""

from typing import Optional, Sequence

from metasae_jax.core.errors import UserError


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
