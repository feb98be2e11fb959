"""On-disk cache of LLM answers keyed by a hash of the request, so reruns issue no requests."""

import hashlib
import json
import os
from typing import Sequence

from metasae_jax.storage import atomic
from metasae_jax.autointerp.backends import Backend, Completion


class CachedBackend:
  """Wraps a backend; answers found in `cache_dir` are returned without calling it. Failures are not cached."""

  def __init__(self, inner: Backend, cache_dir: str):
    self.inner, self.cache_dir = inner, cache_dir
    self.name = inner.name
    self.hits = 0
    self.requests = 0

  def key(self, messages: list, max_tokens: int, choices: Sequence[str]) -> str:
    blob = json.dumps({"backend": self.inner.name, "messages": messages, "max_tokens": max_tokens,
                       "choices": list(choices)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    path = os.path.join(self.cache_dir, self.key(messages, max_tokens, choices) + ".json")
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          out = Completion.from_json(json.load(f))
        self.hits += 1
        return out
      except (ValueError, KeyError, TypeError):
        pass  # a damaged entry is simply asked again
    self.requests += 1
    out = self.inner.complete(messages, max_tokens, choices)
    atomic.write_json(path, out.to_json())
    return out
