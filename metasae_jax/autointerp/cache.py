"""On-disk cache of LLM answers keyed by a hash of the request, so reruns and resumed runs issue no repeated requests."""

import hashlib
import json
import os
import threading
from typing import Optional, Sequence

from metasae_jax.storage import atomic
from metasae_jax.autointerp.backends import Backend, Completion


class CachedBackend:
  """Wraps a backend; answers found in `cache_dir` are returned without calling it. Failures are not cached.

  Safe to call from many threads: each answer is its own file, written atomically
  (unique temp file + rename) as soon as it arrives, so an interrupted run keeps
  every finished answer and two writers of one key leave one whole entry.
  """

  def __init__(self, inner: Backend, cache_dir: str):
    self.inner, self.cache_dir = inner, cache_dir
    self.name = inner.name
    self.hits = 0
    self.requests = 0
    self._lock = threading.Lock()

  def key(self, messages: list, max_tokens: int, choices: Sequence[str]) -> str:
    blob = json.dumps({"backend": self.inner.name, "messages": messages, "max_tokens": max_tokens,
                       "choices": list(choices)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

  def _path(self, key: str) -> str:
    return os.path.join(self.cache_dir, key + ".json")

  def lookup(self, key: str) -> Optional[Completion]:
    """The cached answer for `key` (counted as a hit), or None."""
    path = self._path(key)
    if not os.path.isfile(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        out = Completion.from_json(json.load(f))
    except (ValueError, KeyError, TypeError):
      return None  # a damaged entry is simply asked again
    self.count_hit()
    return out

  def count_hit(self) -> None:
    with self._lock:
      self.hits += 1

  def ask(self, key: str, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    """Calls the backend (no cache lookup) and stores the answer under `key`."""
    with self._lock:
      self.requests += 1
    out = self.inner.complete(messages, max_tokens, choices)
    atomic.write_json(self._path(key), out.to_json())
    return out

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    key = self.key(messages, max_tokens, choices)
    out = self.lookup(key)
    return out if out is not None else self.ask(key, messages, max_tokens, choices)
