"""On-disk cache of LLM answers keyed by a hash of the request, so reruns and resumed runs issue no repeated requests."""

import hashlib
import json
import os
import tempfile
import threading
from typing import Optional, Sequence

from metasae_jax.storage import atomic
from metasae_jax.autointerp.backends import Backend, Completion


def _write_entry(path: str, obj: dict) -> None:
  """Unique temp file + rename: readers and a killed writer never leave a partial entry.

  No fsync, unlike storage.atomic: an entry lost to a power cut is simply asked
  again, and an fsync per answer costs more than the request itself (~20 ms here).
  """
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=atomic.TEMP_SUFFIX,
                             dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class CachedBackend:
  """Wraps a backend; answers found in `cache_dir` are returned without calling it. Failures and malformed
  replies are not cached.

  Safe to call from many threads: each answer is its own file, written atomically
  (unique temp file + rename) as soon as it arrives, so an interrupted run keeps
  every finished answer and two writers of one key leave one whole entry.
  """

  def __init__(self, inner: Backend, cache_dir: str):
    self.inner, self.cache_dir = inner, cache_dir
    self.name = inner.name
    self.hits = 0
    self.requests = 0
    self.last_problem: Optional[str] = None
    """The latest failed request or malformed reply, for the error when no answer was usable."""
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
    if out.malformed:
      self.last_problem = out.malformed
    else:
      _write_entry(self._path(key), out.to_json())
    return out

  def complete(self, messages: list, max_tokens: int, choices: Sequence[str] = ()) -> Completion:
    key = self.key(messages, max_tokens, choices)
    out = self.lookup(key)
    return out if out is not None else self.ask(key, messages, max_tokens, choices)
